"""Pictures of a quantized run: per-channel activation ranges before and after a method's
transform (RPTQ's Figure 1), the cluster layout, the per-layer block error, perplexity per run.

Every function builds a matplotlib Figure on the Agg canvas without pyplot, so there is no global
figure registry to leak between calls or threads; it saves the PNG atomically when given a path and
returns the Figure, so callers and tests can read back exactly what was drawn.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.atomic import atomic_write
from eval.table import row_label
from common.errors import UserError

DPI = 100
BEFORE, AFTER, RANGE = "#7f7f7f", "#1f77b4", "#d62728"
PPL_FIRST = ("wikitext2", "ptb", "c4")
METRICS = ("sqnr_db", "rel_mse")


# ---------------------------------------------------------------- figures and files
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path) -> Path:
    """Write fig as PNG through a temporary file, so a reader never sees half an image."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return Path(path)


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def run_colors(labels) -> dict[str, tuple]:
    """One colour per run label, so a run looks the same in every chart of a report."""
    labels = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        save_png(fig, path)
    return fig


# ---------------------------------------------------------------- channel ranges (RPTQ Fig. 1)
def _vec(data: dict, key: str, dtype=np.float64) -> np.ndarray:
    return np.asarray(data[key], dtype=dtype).reshape(-1)


def _band(ax, lo: np.ndarray, hi: np.ndarray, color: str, label: str, gid: str, alpha: float) -> None:
    """Channel i is a bar from its min to its max over [i, i+1): the paper's picture, and at
    thousands of channels it reads as a band whose spikes are the outlier channels."""
    ax.stairs(hi, np.arange(len(hi) + 1), baseline=lo, fill=True, facecolor=color, edgecolor=color,
              lw=0.6, alpha=alpha, label=label, gid=gid)  # the edge keeps a 1-channel spike >= 1 px wide
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlim(0, len(hi))
    ax.set_ylabel("activation value")


def _ylim(ax, *arrays) -> None:
    """Autoscaling ignores a StepPatch's array baseline, so the lowest bars would be cut off."""
    lo, hi = min(float(np.min(a)) for a in arrays), max(float(np.max(a)) for a in arrays)
    pad = 0.06 * max(hi - lo, 1e-12)
    ax.set_ylim(lo - pad, hi + pad)


def _clusters(ax, sizes: np.ndarray, gmin, gmax) -> None:
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if len(ends) > 1:
        ax.vlines(ends[:-1], 0, 1, transform=ax.get_xaxis_transform(), colors="black", lw=0.7,
                  linestyles=":", label=f"cluster boundary ({len(sizes)} clusters)", gid="cluster_boundaries")
    if gmin is not None:
        ax.hlines(gmax, starts, ends, colors=RANGE, lw=1.8, label="cluster quantization\nrange [min, max]",
                  gid="cluster_max")
        ax.hlines(gmin, starts, ends, colors=RANGE, lw=1.8, gid="cluster_min")


def check_plot_data(data: dict, name: str = "plot data") -> None:
    """Raise UserError unless the tensors have the shapes the pictures assume."""
    missing = [k for k in ("before_min", "before_max", "after_min", "after_max") if k not in data]
    if missing:
        raise UserError(f"{name} lacks {', '.join(missing)}; rerun with --act_dist_plot")
    n_before, n_after = len(_vec(data, "before_min")), len(_vec(data, "after_min"))
    if len(_vec(data, "before_max")) != n_before or len(_vec(data, "after_max")) != n_after:
        raise UserError(f"{name}: min and max have different channel counts")
    if "group_sizes" in data:
        sizes = _vec(data, "group_sizes", np.int64)
        if sizes.sum() != n_after or (sizes <= 0).any():
            raise UserError(f"{name}: group_sizes sum to {sizes.sum()}, not the {n_after} channels")
        for key in ("group_min", "group_max"):
            if key in data and len(_vec(data, key)) != len(sizes):
                raise UserError(f"{name}: {key} has {len(_vec(data, key))} entries for {len(sizes)} clusters")


def plot_channel_ranges(data: dict, meta: dict, path=None) -> Figure:
    """Per-channel [min, max] of one activation point over the calibration tokens, before the
    transform (original channel order) and after it. A reorder gets two panels, the second in
    cluster order with cluster boundaries and each cluster's quantization range; a scale or
    rotation draws before and after overlaid on the same axes (same channel index)."""
    check_plot_data(data, f"layer {meta.get('layer')} point {meta.get('point')}")
    bmin, bmax = _vec(data, "before_min"), _vec(data, "before_max")
    amin, amax = _vec(data, "after_min"), _vec(data, "after_max")
    transform = str(meta.get("transform") or "none")
    steps = transform.split("+")
    sizes = _vec(data, "group_sizes", np.int64) if "group_sizes" in data else None
    has_range = sizes is not None and "group_min" in data and "group_max" in data
    gmin, gmax = (_vec(data, "group_min"), _vec(data, "group_max")) if has_range else (None, None)
    method = meta.get("method", "?")
    if "reorder" in steps:
        fig = _figure(12, 7.5)
        ax_b, ax_a = fig.subplots(2, 1)
        _band(ax_b, bmin, bmax, BEFORE, "per-channel [min, max]", "before", 0.9)
        ax_b.set(title=f"before {method}", xlabel="channel (original order)")
        _band(ax_a, amin, amax, AFTER, "per-channel [min, max]", "after", 0.9)
        order = "cluster order" + (", " + " + ".join(s for s in steps if s != "reorder") + "d" if len(steps) > 1 else "")
        ax_a.set(title=f"after {method} ({transform})", xlabel=f"channel ({order})")
        axes = (ax_b, ax_a)
    else:
        fig = _figure(12, 4.8)
        ax_a = fig.subplots()
        _band(ax_a, bmin, bmax, BEFORE, "before: per-channel [min, max]", "before", 0.55)
        _band(ax_a, amin, amax, AFTER, f"after {transform}: per-channel [min, max]", "after", 0.55)
        basis = "; after: rotated basis" if "rotation" in steps else ""
        ax_a.set(title=f"before vs after {method} ({transform})", xlabel=f"channel (original order{basis})")
        axes = (ax_a,)
    if sizes is not None:
        _clusters(ax_a, sizes, gmin, gmax)
    extra = (gmin, gmax) if has_range else ()
    if transform == "reorder":  # same values, other order: one y scale makes the panels comparable
        for ax in axes:
            _ylim(ax, bmin, bmax, amin, amax, *extra)
    else:
        _ylim(axes[0], bmin, bmax, *((amin, amax, *extra) if len(axes) == 1 else ()))
        _ylim(axes[-1], amin, amax, *extra, *((bmin, bmax) if len(axes) == 1 else ()))
    for ax in axes:  # outside the axes: outlier channels sit anywhere, the largest cluster at the right
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False)
    fig.suptitle(f"{meta.get('model', '?')}: layer {meta.get('layer', '?')}, point {meta.get('point', '?')}, "
                 f"{method}: per-channel activation range over the calibration tokens", fontsize=12)
    return _finish(fig, path)


# ---------------------------------------------------------------- cluster map
def plot_cluster_map(entries: list[dict], path=None, title: str | None = None) -> Figure:
    """One row per (layer, point): a bar cut into the clusters (segment width = cluster size, in
    cluster order), each coloured by the width of its quantization range max - min.
    entries: dicts with layer, point, group_sizes and optionally group_min / group_max."""
    rows = [e for e in entries if e.get("group_sizes") is not None]
    if not rows:
        raise UserError("no reorder point with group_sizes to draw a cluster map of")
    widths = [np.asarray(e["group_max"], float) - np.asarray(e["group_min"], float)
              for e in rows if e.get("group_min") is not None and e.get("group_max") is not None]
    spans = np.concatenate(widths) if widths else np.ones(1)
    positive = spans[spans > 0]
    norm = (LogNorm(positive.min(), positive.max()) if len(positive) and positive.max() > positive.min()
            else Normalize(0.0, max(float(spans.max()), 1e-12)))
    cmap = colormaps["viridis"]
    height = 1.6 + 0.42 * len(rows)
    fig = _figure(12, height)
    ax = fig.subplots()
    labels = []
    for y, entry in enumerate(rows):
        sizes = np.asarray(entry["group_sizes"], dtype=np.int64).reshape(-1)
        ends = np.cumsum(sizes)
        if entry.get("group_min") is not None and entry.get("group_max") is not None:
            span = np.asarray(entry["group_max"], float) - np.asarray(entry["group_min"], float)
            colors = cmap(norm(np.clip(span, positive.min() if len(positive) else 0, None)))
        else:
            colors = "lightgrey"
        ax.barh(y, sizes, left=ends - sizes, height=0.7, color=colors, edgecolor="white", lw=0.6,
                gid=f"row{y}")
        ax.text(ends[-1] * 1.005, y, f" {len(sizes)} clusters, sizes {sizes.min()}–{sizes.max()}",
                va="center", fontsize=8)
        labels.append(f"layer {entry['layer']} · {entry['point']}")
    ax.set_yticks(range(len(rows)), labels, fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no empty margin
    ax.set_xlim(0, max(int(np.sum(e["group_sizes"])) for e in rows) * 1.25)
    ax.set_xlabel("channel (cluster order); segment width = cluster size")
    bar = fig.colorbar(mappable=_mappable(norm, cmap), ax=ax, pad=0.01, shrink=min(1.0, 6.0 / height))
    bar.set_label("cluster quantization range max − min\n(activation units" +
                  (", log scale)" if isinstance(norm, LogNorm) else ")"))
    ax.set_title(title or "Cluster layout per layer and reorder point")
    return _finish(fig, path)


def _mappable(norm, cmap):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)


# ---------------------------------------------------------------- per-layer error
def _rel_to_metric(rel: np.ndarray, metric: str) -> np.ndarray:
    if metric == "rel_mse":
        return rel
    with np.errstate(divide="ignore"):
        return -10.0 * np.log10(rel)  # rel 0 -> +inf: an exact layer has no finite SQNR


def _series(layer_errors: list[dict], detail: bool) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{panel: {curve name: (layers, rel)}}; without detail, weights and points are averaged per layer."""
    rows = sorted(layer_errors, key=lambda e: e["layer"])
    out = {"block": {"": (np.array([r["layer"] for r in rows]), np.array([r["block_rel_mse"] for r in rows], float))}}
    for panel in ("weights", "points"):
        names = sorted({k for r in rows for k in (r.get(panel) or {})})
        if not names:
            continue
        if detail:
            out[panel] = {n: (np.array([r["layer"] for r in rows if n in (r.get(panel) or {})]),
                              np.array([r[panel][n] for r in rows if n in (r.get(panel) or {})], float))
                          for n in names}
        else:
            has = [r for r in rows if r.get(panel)]
            out[panel] = {"": (np.array([r["layer"] for r in has]),
                               np.array([np.mean(list(r[panel].values())) for r in has], float))}
    return out


_PANEL_TITLES = {"block": "block output vs FP block (same inputs)",
                 "weights": "weight-only: linear output error", "points": "activation-only: quantization error at each point"}


def plot_layer_errors(runs, path=None, metric: str = "sqnr_db", title: str | None = None,
                      detail: bool = False, colors: dict | None = None) -> Figure:
    """Per-layer error curves, runs overlaid. runs: [(label, layer_errors)] with results.json's
    layer_errors entries. Panels: the block's output error, and where recorded the weight-only and
    activation-only errors (mean over linears / points; with detail=True one curve per linear /
    point, meant for a single run). colors: {label: colour}, by default one per run. SQNR is
    computed from block_rel_mse (-10 log10), so an exact layer is +inf dB and is left out with a
    note in the legend; relative MSE uses a symlog axis whose linear part holds 0, so an
    unquantized run is drawn as 0 without log(0)."""
    if metric not in METRICS:
        raise UserError(f"unknown error metric {metric!r}; use one of {', '.join(METRICS)}")
    series = [(label, _series(errs, detail)) for label, errs in runs if errs]
    if not series:
        raise UserError("no run has layer_errors to plot")
    panels = [p for p in ("block", "weights", "points") if any(p in s for _, s in series)]
    colors = colors or run_colors(label for label, _ in series)
    fig = _figure(12, 1.2 + 3.3 * len(panels))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    ylabel = "SQNR (dB, higher is better)" if metric == "sqnr_db" else "relative MSE ‖Q−F‖²/‖F‖²"
    for ax, panel in zip(axes, panels):
        drawn = []
        for label, s in series:
            for name, (layers, rel) in s.get(panel, {}).items():
                y = _rel_to_metric(rel, metric)
                exact = ~np.isfinite(y)
                text = " · ".join(t for t in (label, name) if t)
                if exact.any():
                    text += " (error 0 at all layers: SQNR ∞)" if exact.all() else f" (SQNR ∞ at {exact.sum()} layers)"
                style = {} if detail else {"color": colors.get(label)}  # detail: one colour per linear
                line, = ax.plot(layers, np.where(exact, np.nan, y), marker="o", ms=3.5, lw=1.4, label=text, **style)
                line.set_gid(f"{panel}:{text}")
                drawn.append(y[~exact])
        values = np.concatenate(drawn) if drawn else np.zeros(0)
        if metric == "rel_mse":
            _log_axis_with_zero(ax, values)
        ax.set_ylabel(ylabel)
        ax.set_title(_PANEL_TITLES[panel] + ("" if detail or panel == "block" else " (mean per layer)"), fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1].set_xlabel("decoder layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "Per-layer quantization error", fontsize=12)
    return _finish(fig, path)


def _log_axis_with_zero(ax, values: np.ndarray) -> None:
    positive = values[values > 0]
    if len(positive) and len(positive) == len(values):
        ax.set_yscale("log")
        return
    if not len(positive):  # every layer exact (an unquantized run): a plain axis with the zeros on it
        ax.set_ylim(-0.02, 1.0)
        return
    floor = 10.0 ** math.floor(math.log10(positive.min())) if len(positive) else 1e-6
    ax.set_yscale("symlog", linthresh=floor)  # linear in [0, floor]: zeros stay drawable
    ax.set_ylim(bottom=0.0)


# ---------------------------------------------------------------- perplexity
def plot_ppl_chart(runs, path=None, title: str | None = None, colors: dict | None = None) -> Figure:
    """Grouped bars: one group per dataset, one bar per run (runs: [(label, {dataset: ppl})]),
    value written on each bar; log scale when the largest perplexity is more than 10x the smallest."""
    colors = colors or run_colors(label for label, _ in runs)
    runs = [(label, {d: v for d, v in (ppl or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)})
            for label, ppl in runs]
    sets = {d for _, ppl in runs for d in ppl}
    datasets = [d for d in PPL_FIRST if d in sets] + sorted(sets - set(PPL_FIRST))
    if not datasets:
        raise UserError("no run has a finite perplexity to chart")
    values = [v for _, ppl in runs for v in ppl.values()]
    log = min(values) > 0 and max(values) / min(values) > 10
    fig = _figure(12, 5.2)
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, (label, ppl) in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, d in enumerate(datasets) if d in ppl]
        hs = [ppl[d] for d in datasets if d in ppl]
        bars = ax.bar(xs, hs, width * 0.92, label=label, color=colors.get(label), gid=f"run{i}")
        ax.bar_label(bars, [f"{h:.2f}" if h < 1000 else f"{h:.3g}" for h in hs], fontsize=8, padding=1,
                     rotation=90 if len(runs) > 4 else 0)
    ax.set_xticks(range(len(datasets)), datasets)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_xlabel("evaluation dataset")
    ax.set_ylabel("perplexity (lower is better" + (", log scale)" if log else ")"))
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "Perplexity per run")
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, path)


# ---------------------------------------------------------------- one run's pictures
def read_plot_data(path) -> tuple[dict, dict]:
    """(tensors as numpy arrays, metadata) of one plot-data safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read plot data {path}: {exc}") from exc


def _data_files(out: Path, results: dict) -> list[Path]:
    plots = results.get("plots") or {}
    if plots.get("data"):  # relative to OUTPUT_PATH (also accepted: relative to the plots dir)
        base = out / plots.get("dir", "plots")
        return [out / p if (out / p).exists() else base / p for p in plots["data"]]
    return sorted((out / plots.get("dir", "plots") / "data").glob("*.safetensors"))


def render_run_plots(output_path) -> list[Path]:
    """Draw every picture a finished run has data for into OUTPUT_PATH/plots/ (atomically):
    one channel-range figure per plot-data file (same name, .png), cluster_map.png when any point
    was reordered, layer_errors.png (SQNR per layer, or relative MSE when a layer is exact; one curve
    per linear and point) when results.json has layer_errors. Returns the PNG paths written."""
    out = Path(output_path)
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {out / 'results.json'}: {exc}") from exc
    plot_dir = out / (results.get("plots") or {}).get("dir", "plots")
    written, clusters = [], []
    for file in _data_files(out, results):
        data, meta = read_plot_data(file)
        meta.setdefault("model", results.get("model", "?"))
        written.append(save_png(plot_channel_ranges(data, meta), plot_dir / (file.stem + ".png")))
        if "group_sizes" in data:
            clusters.append({"layer": int(meta.get("layer", -1)), "point": meta.get("point", file.stem),
                             **{k: data.get(k) for k in ("group_sizes", "group_min", "group_max")}})
    method = (results.get("method") or {}).get("name", "rptq")
    try:
        label = f"{method} {row_label(results['config'])}"
    except (KeyError, TypeError):  # a results.json without bit settings: the method name alone
        label = method
    if clusters:
        clusters.sort(key=lambda e: e["layer"])
        written.append(save_png(plot_cluster_map(clusters, title=f"{results.get('model', '?')}, {label}: "
                                                 "clusters per layer and reorder point"), plot_dir / "cluster_map.png"))
    errors = results.get("layer_errors") or []
    if errors:
        exact = any(e["block_rel_mse"] == 0 for e in errors)  # no finite SQNR: draw 0 on a rel-MSE axis
        fig = plot_layer_errors([(label, errors)], detail=True, metric="rel_mse" if exact else "sqnr_db",
                                title=f"{results.get('model', '?')}, {label}: per-layer error")
        written.append(save_png(fig, plot_dir / "layer_errors.png"))
    return written
