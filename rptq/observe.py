"""What the full-precision pass records at each activation point of a block."""
from __future__ import annotations

from models.spec import PROBS
from quant.quantizer import FULL_PRECISION

from .config import QuantConfig
from .stats import ChannelObserver, sample_per_call

ERROR_SAMPLE_TOKENS = 256  # token rows kept per linear input to measure weight-only error


def make_observers(spec, cfg: QuantConfig, samples: int, layer: int) -> dict[str, ChannelObserver]:
    """What the FP pass records at each point. Softmax outputs need nothing (a fixed grid or FP)."""
    quantize_w = cfg.weight_bits < FULL_PRECISION
    hessian = quantize_w and cfg.w_quantizer in ("gptq", "gptqt")
    linear_points = set(spec.linear_inputs.values())
    qk_points = {spec.qk_edge.q_point, spec.qk_edge.k_point}
    observers = {}
    for i, (point, role) in enumerate(spec.points.items()):
        if role == PROBS:
            continue
        tokens = ERROR_SAMPLE_TOKENS if point in linear_points else 0
        if cfg.metric == "mse":
            tokens = max(tokens, 2048)
        if "rotate" in cfg.transforms and point in linear_points:
            tokens = max(tokens, cfg.rotation.sample_tokens)
        if "qk_rotate" in cfg.transforms and point in qk_points:  # mixed channels: later steps read the sample
            tokens = max(tokens, cfg.rotation.sample_tokens)
        observers[point] = ChannelObserver(hessian=hessian and point in linear_points,
                                           sample_per_call=sample_per_call(tokens, samples),
                                           seed=cfg.seed * 1009 + layer * 101 + i)
    return observers
