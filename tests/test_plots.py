"""eval.plots and the HTML report: what is drawn equals the statistics given, files are written
atomically, and the report renders in headless Chromium."""
import base64
import io
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from PIL import Image

from common.errors import UserError
from eval import error_plots, html_report, plot_data, plots, range_plots, report
from tests.report_fixtures import layer_errors, reorder_data, scale_data, write_demo_runs

ROOT = Path(__file__).resolve().parent.parent
META = {"model": "opt-125m", "layer": "3", "point": "qkv_in", "method": "rptq", "transform": "reorder"}


def by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.is_file()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Five synthetic runs with their pictures drawn once: (root, run dirs, {run name: PNGs written})."""
    root = tmp_path_factory.mktemp("demo")
    runs = write_demo_runs(root, layers=(0, 5))
    return root, runs, {run.name: plots.render_run_plots(run) for run in runs}


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert report.main([str(demo[0]), "--out", str(out)]) == 0
    return out


def test_reorder_figure_draws_the_statistics_and_the_layout(tmp_path):
    data = reorder_data(np.random.default_rng(1), channels=96, clusters=6)
    fig = range_plots.plot_channel_ranges(data, META, tmp_path / "ranges.png")
    ax_b, ax_a = fig.axes[:2]
    (before,), (after,) = by_gid(ax_b, "before"), by_gid(ax_a, "after")
    for patch, lo, hi in ((before, data["before_min"], data["before_max"]), (after, data["after_min"], data["after_max"])):
        values, edges, baseline = patch.get_data()  # bar of channel i: [min, max] over [i, i + 1)
        np.testing.assert_array_equal(values, hi)
        np.testing.assert_array_equal(baseline, lo)
        np.testing.assert_array_equal(edges, np.arange(97))
    (bounds,) = by_gid(ax_a, "cluster_boundaries")
    xs = [seg[0][0] for seg in bounds.get_segments()]
    np.testing.assert_array_equal(xs, np.cumsum(data["group_sizes"])[:-1])
    for gid, want in (("cluster_max", data["group_max"]), ("cluster_min", data["group_min"])):
        (lines,) = by_gid(ax_a, gid)
        segs = np.array(lines.get_segments())  # one horizontal segment per cluster, over its channels
        np.testing.assert_allclose(segs[:, 0, 1], want)
        np.testing.assert_array_equal(segs[:, 0, 0], np.cumsum(data["group_sizes"]) - data["group_sizes"])
        np.testing.assert_array_equal(segs[:, 1, 0], np.cumsum(data["group_sizes"]))
    assert (ax_b.get_xlabel(), ax_a.get_xlabel()) == ("channel (original order)", "channel (cluster order)")
    assert ax_b.get_ylabel() == ax_a.get_ylabel() == "activation value"
    assert ax_b.get_ylim() == ax_a.get_ylim()  # same values reordered: one scale
    assert ax_a.get_ylim()[0] < data["before_min"].min() and ax_a.get_ylim()[1] > data["before_max"].max()
    title = fig.get_suptitle()
    assert all(s in title for s in ("opt-125m", "layer 3", "qkv_in", "rptq"))
    assert [t.get_text() for t in ax_a.get_legend().get_texts()][1:] == \
        ["cluster boundary (6 clusters)", "cluster quantization\nrange [min, max]"]
    assert Image.open(tmp_path / "ranges.png").size == (1200, 750) and no_temp_files(tmp_path)


def test_scale_and_rotation_overlay_on_one_axes():
    data = scale_data(np.random.default_rng(2), channels=64)
    for transform, xlabel in (("scale", "channel (original order)"),
                              ("rotation", "channel (original order; after: rotated basis)")):
        fig = range_plots.plot_channel_ranges(data, {**META, "method": "duquant", "transform": transform})
        (ax,) = fig.axes
        (before,), (after,) = by_gid(ax, "before"), by_gid(ax, "after")
        np.testing.assert_array_equal(before.get_data().values, data["before_max"])
        np.testing.assert_array_equal(after.get_data().baseline, data["after_min"])
        assert ax.get_xlabel() == xlabel and not by_gid(ax, "cluster_boundaries")
        assert ax.get_ylim()[0] < min(data["before_min"].min(), data["after_min"].min())
    combined = reorder_data(np.random.default_rng(3), channels=40, clusters=4)
    fig = range_plots.plot_channel_ranges(combined, {**META, "transform": "scale+reorder"})
    assert fig.axes[1].get_xlabel() == "channel (cluster order, scaled)"
    assert [s[0][0] for s in by_gid(fig.axes[1], "cluster_boundaries")[0].get_segments()] == \
        list(np.cumsum(combined["group_sizes"])[:-1])


def test_inconsistent_plot_data_is_a_user_error():
    data = reorder_data(np.random.default_rng(1), channels=32, clusters=4)
    with pytest.raises(UserError, match="group_sizes sum to 31"):
        range_plots.plot_channel_ranges({**data, "group_sizes": data["group_sizes"] - np.eye(4, dtype=np.int64)[0]}, META)
    with pytest.raises(UserError, match="lacks after_max"):
        range_plots.plot_channel_ranges({k: v for k, v in data.items() if k != "after_max"}, META)


def test_cluster_map_segments_are_the_cluster_sizes_coloured_by_range():
    rng = np.random.default_rng(4)
    entries = [{"layer": L, "point": p, **reorder_data(rng, channels=c, clusters=k)}
               for L, p, c, k in ((0, "qkv_in", 64, 5), (0, "fc2_in", 128, 7), (2, "qkv_in", 64, 3))]
    fig = range_plots.plot_cluster_map(entries, title="opt-125m, rptq W4A4")
    ax = fig.axes[0]
    for y, entry in enumerate(entries):
        rects = [p for p in ax.patches if abs(p.get_y() + p.get_height() / 2 - y) < 1e-9]
        np.testing.assert_array_equal([r.get_width() for r in rects], entry["group_sizes"])
        np.testing.assert_array_equal([r.get_x() for r in rects], np.cumsum(entry["group_sizes"]) - entry["group_sizes"])
    spans = np.concatenate([e["group_max"] - e["group_min"] for e in entries])
    cbar = fig.axes[1]  # the colour bar spans the cluster ranges max - min, on a log scale
    assert cbar.get_ylim() == pytest.approx((spans.min(), spans.max())) and cbar.get_yscale() == "log"
    norm = LogNorm(spans.min(), spans.max())
    colours = [r.get_facecolor() for r in ax.patches[:5]]
    np.testing.assert_allclose(colours, colormaps["viridis"](norm(entries[0]["group_max"] - entries[0]["group_min"])))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0 · qkv_in", "layer 0 · fc2_in", "layer 2 · qkv_in"]


def test_layer_errors_of_an_unquantized_run_are_zero_without_log_of_zero():
    fp, q = layer_errors(0.0, 0.0, 0.0), layer_errors(0.01, 0.002, 0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log(0) or divide warning fails the test
        fig = error_plots.plot_layer_errors([("FP16", fp), ("W4A4", q)], metric="rel_mse")
        block = fig.axes[0]
        (zero,), (quant,) = by_gid(block, "block:FP16"), by_gid(block, "block:W4A4")
        np.testing.assert_array_equal(zero.get_ydata(), np.zeros(6))
        np.testing.assert_allclose(quant.get_ydata(), [e["block_rel_mse"] for e in q])
        assert block.get_yscale() == "symlog" and block.get_ylim()[0] == 0.0
        (weights,) = by_gid(fig.axes[1], "weights:W4A4")  # mean over the block's linears
        np.testing.assert_allclose(weights.get_ydata(), [np.mean(list(e["weights"].values())) for e in q])
        assert len(fig.axes) == 3 and not by_gid(fig.axes[1], "weights:FP16")  # nothing measured: no curve
        fig = error_plots.plot_layer_errors([("FP16", fp), ("W4A4", q)], metric="sqnr_db")
        (zero,) = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("FP16")]
        assert np.isnan(zero.get_ydata()).all() and "SQNR ∞" in zero.get_label()
        (quant,) = by_gid(fig.axes[0], "block:W4A4")
        np.testing.assert_allclose(quant.get_ydata(), [-10 * np.log10(e["block_rel_mse"]) for e in q])
        fig = error_plots.plot_layer_errors([("FP16", fp)], metric="rel_mse")  # only zeros: a plain axis
        assert fig.axes[0].get_yscale() == "linear" and list(fig.axes[0].lines[0].get_ydata()) == [0.0] * 6
    assert fig.axes[-1].get_xlabel() == "decoder layer"
    with pytest.raises(UserError, match="unknown error metric"):
        error_plots.plot_layer_errors([("W4A4", q)], metric="db")


def test_ppl_chart_heights_and_log_scale_only_for_a_wide_spread():
    runs = [("FP16", {"ptb": 38.9, "wikitext2": 27.6}), ("W4A4", {"ptb": 60.3}), ("per-tensor", {"ptb": 2.3e5})]
    fig = error_plots.plot_ppl_chart(runs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["wikitext2", "ptb"] and ax.get_yscale() == "log"
    for i, (label, ppl) in enumerate(runs):
        (bars,) = [c for c in ax.containers if c.get_label() == label]
        assert [b.get_height() for b in bars] == [ppl[d] for d in ("wikitext2", "ptb") if d in ppl]
    assert error_plots.plot_ppl_chart(runs[:2]).axes[0].get_yscale() == "linear"
    assert "perplexity" in ax.get_ylabel() and "log" in ax.get_ylabel()


def test_render_run_plots_writes_every_picture_atomically(demo):
    root, runs, written = demo
    assert sorted(p.name for p in written["rptq-w4a8"]) == ["cluster_map.png", "layer000_fc1_in.png",
                                                            "layer000_qkv_in.png", "layer005_fc1_in.png",
                                                            "layer005_qkv_in.png", "layer_errors.png"]
    assert [p.name for p in written["smoothquant-w8a8"]] == ["layer000_qkv_in.png", "layer005_qkv_in.png",
                                                              "layer_errors.png"]
    assert [p.name for p in written["fp16"]] == ["layer_errors.png"]  # no plot data: the error curves only
    for run in runs:
        assert sorted(run.glob("plots/*.png")) == sorted(written[run.name]) and no_temp_files(run / "plots")
        assert all(Image.open(p).format == "PNG" for p in written[run.name])
    with pytest.raises(UserError, match="cannot read"):
        plots.render_run_plots(root / "nowhere")


def test_plot_data_written_by_a_run_is_what_the_pictures_read(tmp_path):
    """rptq's write_plot_data goes through eval.plot_data: file name, tensors and metadata round-trip,
    and render_run_plots draws from them."""
    import torch

    from rptq.run_report import write_plot_data

    data = reorder_data(np.random.default_rng(5), channels=48, clusters=4)
    report_ = type("Report", (), {"plot_data": {3: {"qkv_in": {"_transform": "reorder",
                                                              **{k: torch.from_numpy(v) for k, v in data.items()}}}}})
    written = write_plot_data(tmp_path, report_, "/models/opt-125m", "rptq")
    assert written == [plot_data.data_file(3, "qkv_in")] == ["plots/data/layer003_qkv_in.safetensors"]
    tensors, meta = plot_data.read_plot_data(tmp_path / written[0])
    assert meta == META and set(meta) == set(plot_data.META_KEYS)
    for key, value in data.items():
        np.testing.assert_array_equal(tensors[key], value)
    (tmp_path / "results.json").write_text('{"model": "opt-125m", "config": {"wbits": 4, "abits": 4}, '
                                           '"plots": {"dir": "plots", "data": ["plots/data/layer003_qkv_in.safetensors"]}}')
    assert [p.name for p in plots.render_run_plots(tmp_path)] == ["layer003_qkv_in.png", "cluster_map.png"]


def test_report_has_every_run_and_inline_images(demo, page):
    root, runs, _ = demo
    text = page.read_text()
    pngs = sorted(p for run in runs for p in (run / "plots").glob("*.png"))
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 2 + len(pngs) and text.count("<img") == len(images)  # ppl chart, error curves, runs'
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (1200, 520)
    assert {base64.b64decode(b) for b in images[2:]} == {p.read_bytes() for p in pngs}
    labels = re.findall(r"<h3>([^<]*)</h3>", text)
    assert labels == ["rptq FP16", "rptq W4A8", "rptq W4A4", "rptq W4A4 (per-tensor baseline)", "smoothquant W8A8"]
    rows = re.findall(r"<tr><td>([^<]*)</td>", text)
    assert rows == ["FP16", "W4A8", "W4A4", "W4A4 (per-tensor baseline)", "W8A8"]  # the paper's order
    assert '<td class="num">230000.00</td>' in text and "<th class=\"num\">ptb (ppl)</th>" in text
    assert not re.search(r"(src|href)=\"(https?:|file:|/)", text)  # self-contained


def test_report_bad_input_is_one_line_error(demo, tmp_path, capsys):
    root = demo[0]
    (tmp_path / "empty").mkdir()

    def run(*argv):
        try:
            return report.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own errors
            return exc.code

    for argv, match in (((tmp_path / "empty", "--out", tmp_path / "r.html"), "no results.json"),
                        ((root, "--out", tmp_path), "is a directory"),
                        ((root, "--out", root / "fp16" / "results.json" / "r.html"), "cannot write"),
                        ((root,), "--out")):
        assert run(*argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "r.html").exists()
    done = subprocess.run([sys.executable, "-m", "eval.report", str(tmp_path / "empty"), "--out", "x.html"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: no results.json")


@pytest.mark.skipif(html_report.find_chromium() is None,
                    reason="chromium not installed (Debian: apt-get install -y chromium; `make install` does it as root)")
def test_report_renders_in_headless_chromium(page, tmp_path):
    shot = tmp_path / "shot.png"
    dom = html_report.screenshot(page, shot, dump_dom=True)  # raises unless chromium exits 0
    assert dom.count("<table>") == 1 and dom.count("<tr>") == 6
    assert dom.count("<img") == page.read_text().count("<img") >= 10
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 200  # not a blank or error page
    tab_blue = (np.abs(pixels - [31, 119, 180]).sum(axis=1) < 30).sum()
    assert tab_blue > 500  # the charts' first run colour: the inline PNGs were decoded and drawn
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically
