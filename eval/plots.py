"""One finished run's pictures, drawn into its OUTPUT_PATH/plots/: a channel-range figure per plot-data
file, the cluster map, and the per-layer error (main.py --act_dist_plot calls render_run_plots).

The pictures themselves: eval.range_plots (channel ranges, cluster map), eval.error_plots (per-layer
error, perplexity), eval.figures (figures and PNG files); their input: eval.plot_data.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError
from eval.error_plots import plot_layer_errors
from eval.figures import save_png
from eval.plot_data import data_files, read_plot_data
from eval.range_plots import plot_channel_ranges, plot_cluster_map
from eval.runs import row_label


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
    for file in data_files(out, results):
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
