"""The plot-data format: one safetensors file per plotted layer and activation point, written by a run
(rptq.run_report) and read by the pictures (eval.plots). Here alone: its file naming, its tensors and
its metadata keys.

    OUTPUT_PATH/plots/data/layer{layer:03d}_{point}.safetensors
    tensors   before_min, before_max, after_min, after_max (per channel, before / after the transform);
              for a reorder also group_sizes (channels per cluster, in cluster order), group_min, group_max
    metadata  model (its directory name), layer, point, method, transform (all strings)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from common.atomic import atomic_write
from common.errors import UserError

DATA_DIR = "plots/data"  # relative to OUTPUT_PATH
META_KEYS = ("model", "layer", "point", "method", "transform")
RANGES = ("before_min", "before_max", "after_min", "after_max")
CLUSTERS = ("group_sizes", "group_min", "group_max")


def data_file(layer: int, point: str) -> str:
    """A plot-data file's path relative to OUTPUT_PATH."""
    return f"{DATA_DIR}/layer{layer:03d}_{point}.safetensors"


def write_plot_data(root: Path, layer: int, point: str, tensors: dict, *, model: str, method: str,
                    transform: str) -> str:
    """Save one point's tensors (torch) atomically under root; returns the path relative to root."""
    # Deliberately lazy: safetensors.torch imports torch (about 7 s cold on the 2-core dev box), which a
    # reader of plots (python -m eval.report) never needs.
    from safetensors.torch import save_file

    rel = data_file(layer, point)
    meta = {"model": Path(model).name, "layer": str(layer), "point": point, "method": method, "transform": transform}
    arrays = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(root) / rel, lambda tmp: save_file(arrays, tmp, metadata=meta))
    return rel


def read_plot_data(path) -> tuple[dict, dict]:
    """(tensors as numpy arrays, metadata) of one plot-data safetensors file."""
    try:
        with safe_open(str(path), framework="np") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read plot data {path}: {exc}") from exc


def vector(data: dict, key: str, dtype=np.float64) -> np.ndarray:
    return np.asarray(data[key], dtype=dtype).reshape(-1)


def check_plot_data(data: dict, name: str = "plot data") -> None:
    """Raise UserError unless the tensors have the shapes the pictures assume."""
    missing = [k for k in RANGES if k not in data]
    if missing:
        raise UserError(f"{name} lacks {', '.join(missing)}; rerun with --act_dist_plot")
    n_before, n_after = len(vector(data, "before_min")), len(vector(data, "after_min"))
    if len(vector(data, "before_max")) != n_before or len(vector(data, "after_max")) != n_after:
        raise UserError(f"{name}: min and max have different channel counts")
    if "group_sizes" in data:
        sizes = vector(data, "group_sizes", np.int64)
        if sizes.sum() != n_after or (sizes <= 0).any():
            raise UserError(f"{name}: group_sizes sum to {sizes.sum()}, not the {n_after} channels")
        for key in ("group_min", "group_max"):
            if key in data and len(vector(data, key)) != len(sizes):
                raise UserError(f"{name}: {key} has {len(vector(data, key))} entries for {len(sizes)} clusters")


def data_files(out: Path, results: dict) -> list[Path]:
    """The plot-data files of the run in OUTPUT_PATH `out`: those results.json lists (relative to
    OUTPUT_PATH, also accepted: relative to the plots dir), else every file in the data dir."""
    plots = results.get("plots") or {}
    if plots.get("data"):
        base = out / plots.get("dir", "plots")
        return [out / p if (out / p).exists() else base / p for p in plots["data"]]
    return sorted((out / plots.get("dir", "plots") / "data").glob("*.safetensors"))
