"""The figures of docs/results.md, drawn from the runs stored in docs/runs alone: the activation ranges of the
W4A4 runs from their stored plot data, and the per-layer error of the W4A4 runs side by side from their
results.json, and the norm-fed points' ranges before and after R1 (QuaRot, SpinQuant) (PNG files written
atomically next to the doc; returns the markdown lines)."""
from __future__ import annotations

from pathlib import Path

from eval.error_plots import plot_layer_errors
from eval.figures import save_png
from eval.plot_data import data_file, data_files, read_plot_data
from eval.range_plots import plot_channel_ranges


def figures_dir(doc: Path) -> Path:
    """docs/results.md draws into docs/figures; another model's doc (docs/results-<model>.md) into its own folder,
    so neither deletes the other's figures as unreferenced."""
    return doc.parent / ("figures" if doc.stem == "results" else f"figures-{doc.stem}")


def figures_section(runs: dict[str, dict], doc: Path) -> list[str]:
    """Draw each W4A4 run's stored plot data (RPTQ, per-tensor) and the per-layer error of the W4A4 runs
    (RPTQ vs per-tensor, and the rotation methods' W4A4 runs where present)."""
    rptq, per_tensor = runs.get("ppl/W4A4"), runs.get("ppl/W4A4-per-tensor")
    if rptq is None or per_tensor is None:
        return ["(not generated yet: needs ppl/W4A4 and ppl/W4A4-per-tensor)"]
    figures = figures_dir(doc)
    lines = []
    for tag, run in (("rptq-w4a4", rptq), ("per-tensor-w4a4", per_tensor)):
        stored = Path(run["_path"]).parent
        for file in data_files(stored, run) if (run.get("plots") or {}).get("data") else []:
            data, meta = read_plot_data(file)
            meta.setdefault("model", run.get("model", "?"))
            dest = save_png(plot_channel_ranges(data, meta), figures / f"{tag}-{file.stem}.png")
            lines += [f"![{tag} {file.stem}]({figures.name}/{dest.name})", ""]
    lines += residual_rotation_figures(runs, rptq, figures)
    curves = [("RPTQ W4A4", rptq), ("per-tensor W4A4", per_tensor)]
    curves += [(name.split("/")[1], runs[name]) for name in ("methods/W4A4-duquant", "methods/W4A4-duquant-gptq",
                                                             "methods/W4A4-rotation", "methods/W4A4-quarot",
                                                             "methods/W4A4-spinquant") if name in runs]
    curves = [(label, run["layer_errors"]) for label, run in curves if run.get("layer_errors")]
    if not curves:
        return lines + ["(no per-layer errors recorded in these runs)"]
    plot_layer_errors(curves, path=figures / "layer-errors-w4a4.png", metric="sqnr_db",
                      title="Per-layer output error of the quantized block vs the FP block (same inputs)")
    return lines + [f"![per-layer error, W4A4 runs]({figures.name}/layer-errors-w4a4.png)", ""]


NORM_FED = ("qkv_in", "gate_up_in")  # the points R1 reaches without a per-block transform of its own


def residual_rotation_figures(runs: dict[str, dict], rptq: dict, figures: Path) -> list[str]:
    """Ranges at the norm-fed points before R1 (the RPTQ run's untransformed input: the norm's output, gain
    included) and after it (QuaRot's / SpinQuant's input there: gain folded into the readers, then rotated),
    same layer and calibration windows, overlaid per channel index."""
    lines = []
    for key, method in (("methods/W4A4-quarot", "QuaRot R1"), ("methods/W4A4-spinquant", "SpinQuant R1")):
        run = runs.get(key)
        if run is None or not (run.get("plots") or {}).get("data"):
            continue
        for rel in run["plots"]["data"]:
            data, meta = read_plot_data(Path(run["_path"]).parent / rel)
            if meta.get("point") not in NORM_FED:
                continue
            before = Path(rptq["_path"]).parent / data_file(int(meta["layer"]), meta["point"])
            if not before.is_file():
                continue
            unrotated, _ = read_plot_data(before)
            pair = {"before_min": unrotated["before_min"], "before_max": unrotated["before_max"],
                    "after_min": data["before_min"], "after_max": data["before_max"]}
            info = {**meta, "method": method, "transform": "rotation", "model": run.get("model", "?")}
            name = f"{key.split('/')[1].lower()}-r1-layer{int(meta['layer']):03d}_{meta['point']}.png"
            dest = save_png(plot_channel_ranges(pair, info), figures / name)
            lines += [f"![{method} at {meta['point']}, layer {meta['layer']}: ranges before R1 (norm output, "
                      f"unrotated) and after (gain folded, rotated)]({figures.name}/{dest.name})", ""]
    return lines
