"""The figures of docs/results.md: copies of the W4A4 runs' activation-range PNGs next to the doc, and the
per-layer error of the W4A4 runs drawn side by side (files written atomically; returns the markdown lines)."""
from __future__ import annotations

import shutil
from pathlib import Path

from common.atomic import atomic_write
from eval.error_plots import plot_layer_errors


def figures_section(runs: dict[str, dict], doc: Path) -> list[str]:
    """Copy the W4A4 runs' activation-range figures next to the doc and draw the per-layer error of the
    W4A4 runs side by side (RPTQ vs per-tensor, and the other methods' W4A4 runs where present)."""
    rptq, per_tensor = runs.get("ppl/W4A4"), runs.get("ppl/W4A4-per-tensor")
    if rptq is None or per_tensor is None:
        return ["(not generated yet: needs ppl/W4A4 and ppl/W4A4-per-tensor)"]
    figures = doc.parent / "figures"
    lines = []
    for tag, run in (("rptq-w4a4", rptq), ("per-tensor-w4a4", per_tensor)):
        pngs = sorted((Path(run["_path"]).parent / "plots").glob("layer*_*.png"))
        for png in pngs:
            dest = figures / f"{tag}-{png.name}"
            atomic_write(dest, lambda tmp, src=png: shutil.copyfile(src, tmp))
            lines += [f"![{tag} {png.stem}](figures/{dest.name})", ""]
    curves = [("RPTQ W4A4", rptq), ("per-tensor W4A4", per_tensor)]
    curves += [(f"{name.split('/')[1]}", runs[name]) for name in ("methods/W4A4-duquant", "methods/W4A4-rotation")
               if name in runs]
    curves = [(label, run["layer_errors"]) for label, run in curves if run.get("layer_errors")]
    if not curves:
        return lines + ["(no per-layer errors recorded in these runs)"]
    plot_layer_errors(curves, path=figures / "layer-errors-w4a4.png", metric="sqnr_db",
                      title="Per-layer output error of the quantized block vs the FP block (same inputs)")
    return lines + ["![per-layer error, W4A4 runs](figures/layer-errors-w4a4.png)", ""]
