"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with a
per-channel scale s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the producer."""
from __future__ import annotations

import torch

from quant.quantizer import QuantSpec

from ..config import FP, QuantConfig, linear_and_qkv_bits
from ..context import BlockContext
from quant.transforms import Scale

_FLOOR = 1e-5  # keeps the powers finite for dead channels (SmoothQuant clamps both maxima alike)


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                    floor: float = _FLOOR) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1 - alpha), at least ``floor`` (s > 0 always)."""
    a = act_absmax.float().clamp(min=_FLOOR)
    w = weight_absmax.float().clamp(min=_FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=floor)


def smoothed_points(ctx: BlockContext) -> list[str]:
    """The norm-fed linear inputs (SmoothQuant) or every linear input (DuQuant), in forward order."""
    spec = ctx.spec
    if ctx.cfg.smooth.points == "norm":
        return [edge.point for edge in spec.norm_edges]
    return list(dict.fromkeys(spec.linear_inputs.values()))


def smooth_step(ctx: BlockContext) -> None:
    settings = ctx.cfg.smooth
    for point in smoothed_points(ctx):
        readers = ctx.spec.readers(point)
        weight_absmax = torch.stack([ctx.block.module(n).weight.detach().abs().amax(0).float().cpu()
                                     for n in readers]).amax(0)
        s = smoothing_scale(ctx.observers[point].absmax(), weight_absmax, settings.alpha, settings.floor)
        where = ctx.apply(point, Scale(s), step="smooth")
        ctx.decisions.setdefault(point, {})["smooth"] = {"where": where, "max_scale": float(s.max()),
                                                         "min_scale": float(s.min())}


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    """SmoothQuant's W8A8: every linear input and the Q/K/V outputs, symmetric, one range per tensor
    (static, as SmoothQuant-O3) or per token (``--a_dynamic``); softmax and its product stay FP."""
    cfg = ctx.cfg
    bits = _bits(cfg, role)
    return QuantSpec(bits=bits, dynamic="token" if cfg.a_dynamic else None, grid="symmetric"), "minmax"


_bits = linear_and_qkv_bits


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    bits = _bits(cfg, role)
    gran = "none" if bits >= FP else ("tensor" if not cfg.a_dynamic else "token") + " symmetric"
    return {"bits": bits, "granularity": gran, "static": bits < FP and not cfg.a_dynamic}
