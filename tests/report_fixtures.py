"""Synthetic runs in the layout main.py writes (results.json with layer_errors and plots, plus
plot-data safetensors), for the plot/report tests and the demo screenshot:

    python -c "from tests.report_fixtures import write_demo_runs; write_demo_runs('/tmp/demo')"
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from rptq.run_report import preset_defaults

MODEL = "opt-125m"
LAYERS = 6


def channel_stats(rng: np.random.Generator, channels: int, outliers: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) with a few outlier channels ~20x wider, as in an OPT LayerNorm output."""
    scale = rng.lognormal(0.0, 0.35, channels)
    scale[rng.choice(channels, outliers, replace=False)] *= rng.uniform(12, 25, outliers)
    return (-scale * rng.uniform(0.6, 1.0, channels)).astype(np.float32), \
        (scale * rng.uniform(0.6, 1.0, channels)).astype(np.float32)


def reorder_data(rng: np.random.Generator, channels: int = 256, clusters: int = 8) -> dict:
    """Channels sorted by range and cut into clusters of uneven size (a stand-in for k-means)."""
    lo, hi = channel_stats(rng, channels)
    perm = np.argsort(hi - lo, kind="stable")
    cuts = np.unique(np.concatenate([[0], np.sort(rng.choice(np.arange(8, channels - 2), clusters - 1,
                                                                replace=False)), [channels]]))
    sizes = np.diff(cuts).astype(np.int64)
    alo, ahi = lo[perm], hi[perm]
    return {"before_min": lo, "before_max": hi, "after_min": alo, "after_max": ahi, "group_sizes": sizes,
            "group_min": np.array([alo[a:b].min() for a, b in zip(cuts[:-1], cuts[1:])], np.float32),
            "group_max": np.array([ahi[a:b].max() for a, b in zip(cuts[:-1], cuts[1:])], np.float32)}


def scale_data(rng: np.random.Generator, channels: int = 256, alpha: float = 0.5) -> dict:
    """SmoothQuant-style: after = before / s with s = max|x|^alpha (weights' side omitted)."""
    lo, hi = channel_stats(rng, channels)
    s = np.maximum(np.abs(lo), np.abs(hi)) ** alpha
    return {"before_min": lo, "before_max": hi, "after_min": (lo / s).astype(np.float32),
            "after_max": (hi / s).astype(np.float32)}


def write_plot_data(path: Path, data: dict, **meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in data.items()}, str(path),
              metadata={k: str(v) for k, v in meta.items()})


def layer_errors(scale: float, weights: float, acts: float) -> list[dict]:
    """Errors growing with depth; scale 0 gives the unquantized run's all-zero entries."""
    out = []
    for layer in range(LAYERS):
        rel = scale * (1 + 0.4 * layer)
        out.append({"layer": layer, "block_rel_mse": rel,
                    "block_sqnr_db": float(-10 * np.log10(rel)) if rel > 0 else 0.0,
                    "points": {p: acts * (1 + 0.3 * layer) * f for p, f in (("qkv_in", 1.0), ("fc2_in", 2.0))}
                    if acts else {},
                    "weights": {w: weights * (1 + 0.1 * layer) * f for w, f in (("fc1", 1.0), ("fc2", 1.5))}
                    if weights else {}})
    return out


def write_run(root: Path, wbits: int, abits: int, method: str = "rptq", ppl=None, errors=None,
              plot_files: dict | None = None, **cfg) -> Path:
    """A results.json like main.py's; plot_files: {file name: (data, meta)} under plots/data."""
    config = {"model": MODEL, "eval_ppl": True, "limit": -1, "nsamples": 128, "seqlen": 2048,
              "calib_dataset": "mix", "num_fewshot": 0, "wbits": wbits, "abits": abits, "only_quant_kv": False,
              "abits_policy": "rptq", "reorder": "12345", "clusters": {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32},
              "metric": "ema_minmax", "a_dynamic": False, "w_quantizer": "gptq", "percdamp": 0.01,
              "disable_w_quant": False, "disable_a_quant": False, "seed": 2, **cfg}
    method_info = {"name": method, "defaults": preset_defaults(config.get("method", "rptq"))}  # as rptq records them
    data = {"model": MODEL, "config": config, "method": method_info, "bit_manifest": {},
            "ppl": ppl or {}, "tasks": {}, "timing": {"calibration_s": 1.0, "eval_s": 2.0},
            "memory": {"peak_rss_mb": 1.0}, "versions": {}, "layer_errors": errors or []}
    if plot_files:
        for name, (arrays, meta) in plot_files.items():
            write_plot_data(root / "plots" / "data" / name, arrays, **meta)
        data["plots"] = {"dir": "plots", "data": [f"plots/data/{n}" for n in plot_files]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(data))
    return root


def write_demo_runs(root, layers=(0, 3)) -> list[Path]:
    """Five runs: FP16, RPTQ W4A8 (reorder plots), W4A4, W4A4 without reordering (per-tensor
    baseline, perplexity far off: the chart goes to a log scale), SmoothQuant W8A8 (scale plots)."""
    root, rng = Path(root), np.random.default_rng(0)

    def meta(layer, point, method, transform):
        return {"model": MODEL, "layer": layer, "point": point, "method": method, "transform": transform}

    reorder = {f"layer{L:03d}_{p}.safetensors": (reorder_data(rng), meta(L, p, "rptq", "reorder"))
               for L in layers for p in ("qkv_in", "fc1_in")}
    scaled = {f"layer{L:03d}_qkv_in.safetensors": (scale_data(rng), meta(L, "qkv_in", "smoothquant", "scale"))
              for L in layers}
    return [write_run(root / "fp16", 16, 16, ppl={"wikitext2": 27.65, "ptb": 38.99},
                      errors=layer_errors(0.0, 0.0, 0.0)),
            write_run(root / "rptq-w4a8", 4, 8, ppl={"wikitext2": 30.1, "ptb": 42.7},
                      errors=layer_errors(0.004, 0.002, 0.001), plot_files=reorder),
            write_run(root / "rptq-w4a4", 4, 4, ppl={"wikitext2": 41.2, "ptb": 60.3},
                      errors=layer_errors(0.03, 0.0025, 0.02)),
            write_run(root / "rptq-w4a4-per-tensor", 4, 4, reorder="", ppl={"wikitext2": 2.3e5, "ptb": 1.9e5},
                      errors=layer_errors(0.4, 0.003, 0.3)),
            write_run(root / "smoothquant-w8a8", 8, 8, method="smoothquant", ppl={"wikitext2": 28.4, "ptb": 40.6},
                      errors=layer_errors(0.001, 0.0004, 0.0006), plot_files=scaled)]
