"""Which runs docs/results.md shows, section by section, as keys "section/run" of docs/runs (the runs
scripts/make_results_doc.sh plans; tests/test_runs_doc.py checks the two agree). Layout only: the
numbers are in the runs."""
from __future__ import annotations

from docgen.doc_runs import EXTRA_SEEDS, seed_key

PAPER = ("FP16", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV",
         "W4A4-per-tensor", "W4A4-uniform", "W4A4-uniform-per-tensor")
# The methods table: (run, what the method is); the bit setting is prefixed from the run's own config.
METHOD_ROWS = (
    ("ppl/FP16", ""),
    ("methods/W8A8-smoothquant", "SmoothQuant (static per-tensor activations)"),
    ("methods/W8A8-smoothquant-per-token", "SmoothQuant, per-token dynamic activations"),
    ("methods/W4A8-fptq", "FPTQ"),
    ("methods/W4A8-fptq-gptq", "FPTQ with GPTQ weights (the paper's Table 7 ablation)"),
    ("ppl/W4A8", "RPTQ"),
    ("methods/W4A8-naive", "naive: per-tensor static activations, RTN weights"),
    ("ppl/W4A16", "GPTQ weights per (row × cluster), activations FP16"),
    ("methods/W4A16-g128-rtn", "RTN weights in groups of 128"),
    ("methods/W4A16-gptq-g64", "GPTQ symmetric weights in groups of 64 (llm-compressor's W4A16 recipe here)"),
    ("methods/W4A8-gptq-g64-per-token", "GPTQ symmetric weights in groups of 64, per-token dynamic activations "
     "(llm-compressor's W4A8 recipe here)"),
    ("methods/W4A16-gptq-g64-act-order", "the same with GPTQ's activation order (`--act_order`, the peer's "
     "default)"),
    ("methods/W4A8-gptq-g64-per-token-act-order", "the same with GPTQ's activation order (`--act_order`)"),
    ("ppl/W4A4", "RPTQ"),
    ("ppl/W4A4-uniform", "RPTQ, uniform policy (every activation at 4 bits)"),
    ("ppl/W4A4-per-tensor", "per-tensor (no reorder)"),
    ("methods/W4A4-duquant", "DuQuant"),
    ("methods/W4A4-duquant-gptq", "DuQuant with GPTQ weights"),
    ("methods/W4A4-rotation", "plain block-Hadamard rotation"),
    ("methods/W4A4-quarot", "QuaRot (GPTQ weights)"),
    ("methods/W4A4-quarot-rtn", "QuaRot-RTN"),
    ("methods/W4A4-spinquant", "SpinQuant"),
    ("methods/W4A4-spinquant-no-learning", "SpinQuant's quantizers and seeded Hadamard R1/R2, not learned "
     "(`--spin_steps 0`, control)"),
    ("methods/W4A4-flatquant", "FlatQuant (RTN weights, 2 epochs per block)"),
    ("methods/W4A4-flatquant-gptq", "FlatQuant with GPTQ weights"),
    ("methods/W4A4-flatquant-best", "FlatQuant, 8 epochs, GPTQ asymmetric weights in groups of 64, asymmetric "
     "activations"),
    ("methods/W4A4-flatquant-best-act-order", "the same with GPTQ's activation order (`--act_order`)"),
    ("methods/W4A4-duquant-gptq-lwc", "DuQuant with GPTQ weights and learned weight clipping (`--w_clip learned`)"),
    ("methods/W4A4-quarot-lwc", "QuaRot with learned weight clipping in place of its clipping search"),
    ("methods/W4A4-duquant-clusters", "DuQuant rotations + RPTQ clusters, static (experiment)"),
    ("methods/W4A4-quarot-reorder", "QuaRot R1 + RPTQ clusters, uniform policy (composition)"),
    ("methods/W4A4-quarot-duquant", "QuaRot R1 + DuQuant's smoothing and rotations (composition)"),
)
# The rows compared at W4A4 and W4A8/W8A8 run with every calibration seed (issue #23: spread).
# Beyond the eight: QuaRot, SpinQuant and SpinQuant without learning, whose gaps are what the learning
# and the rotations are judged by; the candidates for the best run per setting (DuQuant + GPTQ, FlatQuant's best)
# and the rows beside llm-compressor's recipes (issue #34).
SEEDED = ("ppl/W4A4", "ppl/W4A4-uniform", "methods/W4A4-duquant", "methods/W4A4-rotation", "ppl/W4A8",
          "methods/W4A8-fptq", "methods/W8A8-smoothquant-per-token", "ppl/W4A16", "methods/W4A4-quarot",
          "methods/W4A4-spinquant", "methods/W4A4-spinquant-no-learning", "methods/W4A4-flatquant",
          "methods/W4A4-flatquant-best", "methods/W4A4-duquant-gptq", "methods/W4A16-gptq-g64",
          "methods/W4A8-gptq-g64-per-token", "methods/W4A16-gptq-g64-act-order",
          "methods/W4A8-gptq-g64-per-token-act-order", "methods/W4A4-flatquant-best-act-order")
ROTATION_RUNS = ("methods/W4A4-duquant", "methods/W4A4-rotation", "methods/W4A4-duquant-clusters")
# Weight-only: (bits, quantizer, group size) per run name.
WEIGHT_RUNS = tuple(f"weights/W{b}-{q}" for b in (3, 2) for q in ("rtn", "gptq", "gptqt", "bcq", "gptq-g128",
                                                                 "gptqt-g128"))
# Differences from the reference: (alternative run suffix, item, the reference's behaviour, config key); the
# default run is the paper row, except for dynamic ranges, whose "default" is the reference's --a_dynamic.
DIFF_CONFIGS = (("W4A4", "ppl/W4A4"), ("W4A3KV", "ppl/W4A3KV"))
_EMA = "EMA over samples of each sample's cluster extreme"
DIFF_ITEMS = (
    ("grid-full", "integer grid", "2^b levels over [min, max − step]", "grid"),
    ("grid-clamped", "grid clamps", "ours none (scale floor 1e-8); the reference code: scale in [1e-4, 1e4], zero ±1e4",
     "grid"),
    ("w-range-with-zero", "weight range", "plain per-group min/max (0 need not be on the grid)", "w_range"),
    ("metric-ema-channel", "static activation ranges", _EMA, "metric"),
    ("metric-minmax", "static activation ranges", _EMA, "metric"),
    ("metric-mse", "static activation ranges", _EMA, "metric"),
    ("metric-layer-mse", "static activation ranges", _EMA, "metric"),
    ("kmeans-metric", "k-means features", "each channel's global min/max", "kmeans_features"),
    ("kmeans-seed-2", "k-means seed", "random_state 0", "kmeans_seed"),
    ("cluster-order-feature", "cluster order (GPTQ's columns)", "k-means' label order", "cluster_order"),
    ("calib-softmax-fp", "softmax P in the statistics pass", "on its 1/255 grid", "calib_softmax"),
    ("a-dynamic-per-token", "dynamic ranges (`--a_dynamic`)", "one range per cluster and sequence",
     "a_dynamic_method"),
)
DYNAMIC_DEFAULT = "a-dynamic"
TASK_RUNS = ("tasks/FP16", "tasks/W4A4", "tasks/W4A4-duquant", "tasks/W8A8-smoothquant-per-token")
SECTION_RUNS = {
    "paper": tuple(f"ppl/{r}" for r in PAPER),
    "methods": tuple(r for r, _ in METHOD_ROWS) + tuple(seed_key(k, s) for k in SEEDED for s in EXTRA_SEEDS),
    "weights": ("ppl/FP16",) + WEIGHT_RUNS,
    "diffs": tuple(d for _, d in DIFF_CONFIGS) + tuple(
        f"diffs/{c}-{s}" for c, _ in DIFF_CONFIGS for s in (DYNAMIC_DEFAULT,) + tuple(i[0] for i in DIFF_ITEMS)),
    "tasks": TASK_RUNS,
    "ref": ("ref/fp16-5x512", "ref/W4A4-alone"),  # the second: RPTQ W4A4 alone on the machine, for its cost
}


def all_runs() -> list[str]:
    """Every run some section shows, each once, in section order."""
    return list(dict.fromkeys(k for keys in SECTION_RUNS.values() for k in keys))
