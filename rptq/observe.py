"""What the full-precision pass records at each activation point of a block."""
from __future__ import annotations

from models.spec import PROBS
from quant.quantizer import FULL_PRECISION

from . import methods
from .config import QuantConfig
from .stats import ChannelObserver, sample_per_call

ERROR_SAMPLE_TOKENS = 256  # token rows kept per linear input to measure weight-only error


def make_observers(spec, cfg: QuantConfig, samples: int, layer: int) -> dict[str, ChannelObserver]:
    """What the FP pass records at each point. Softmax outputs need nothing (a fixed grid or FP)."""
    quantize_w = cfg.weight_bits < FULL_PRECISION
    hessian = quantize_w and cfg.w_quantizer in ("gptq", "gptqt")
    linear_points = set(spec.linear_inputs.values())
    hessian_points = linear_points
    if hessian and cfg.w_quantizer == "gptq" and cfg.gptq_order == "sequential":
        # GPTQ's sequential order measures every later input's Hessian anew (rptq.weights.remeasure_hessian):
        # this pass needs only the first input's
        hessian_points = {next(iter(spec.linear_inputs.values()))}
    wanted: dict[str, int] = {}  # what the run's steps sample (a rotation search, a learned initialisation)
    for name in cfg.transforms:
        sample = methods.step(name).token_sample
        for point, rows in (sample(cfg, spec) if sample else {}).items():
            wanted[point] = max(wanted.get(point, 0), rows)
    observers = {}
    for i, (point, role) in enumerate(spec.points.items()):
        if role == PROBS:
            continue
        tokens = ERROR_SAMPLE_TOKENS if point in linear_points else 0
        if cfg.metric == "mse":
            tokens = max(tokens, 2048)
        tokens = max(tokens, wanted.get(point, 0))
        observers[point] = ChannelObserver(hessian=hessian and point in hessian_points,
                                           sample_per_call=sample_per_call(tokens, samples),
                                           seed=cfg.seed * 1009 + layer * 101 + i)
    return observers
