"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with a
per-channel scale s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the producer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from quant.quantizer import QuantSpec
from quant.transforms import Scale

from ..config import FP, QuantConfig, linear_and_qkv_bits
from ..context import BlockContext
from ..method_api import Method, Needs, Policy, Step, in_unit_interval, setting

_FLOOR = 1e-5  # keeps the powers finite for dead channels (SmoothQuant clamps both maxima alike)
SMOOTH = Needs(steps=("smooth",))


@dataclass(frozen=True)
class SmoothSettings:
    """SmoothQuant's migration strength and where it applies ("norm": the norm-fed inputs, as
    SmoothQuant; "all": every linear input, as DuQuant)."""

    namespace: ClassVar[str] = "smoothquant"
    alpha: float = setting(0.5, "smooth_alpha", "SmoothQuant's migration strength (duquant: 0.6)", type=float,
                           check=in_unit_interval, needs=SMOOTH)
    points: str = setting("norm", "smooth_points", "smooth the norm-fed linear inputs (SmoothQuant) or every linear "
                          "input (DuQuant)", choices=("norm", "all"), needs=SMOOTH)
    weights: str = setting("readers", "smooth_weights", "the weight maximum in the smoothing scale: over every "
                           "linear reading the input (SmoothQuant) or its lead reader only (DuQuant's released code: "
                           "the query projection for Q/K/V, the up projection for gate/up)",
                           choices=("readers", "lead"), needs=SMOOTH)
    floor: float = 1e-5  # DuQuant floors its smoothing scales at 1e-2 (set by its preset)


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                    floor: float = _FLOOR) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1 - alpha), at least ``floor`` (s > 0 always)."""
    a = act_absmax.float().clamp(min=_FLOOR)
    w = weight_absmax.float().clamp(min=_FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=floor)


def smoothed_points(ctx: BlockContext) -> list[str]:
    """The norm-fed linear inputs (SmoothQuant) or every linear input (DuQuant), in forward order."""
    spec = ctx.spec
    if ctx.cfg.of(SmoothSettings).points == "norm":
        return [edge.point for edge in spec.norm_edges]
    return list(dict.fromkeys(spec.linear_inputs.values()))


def smooth_step(ctx: BlockContext) -> None:
    settings = ctx.cfg.of(SmoothSettings)
    for point in smoothed_points(ctx):
        readers = ctx.spec.readers(point) if settings.weights == "readers" else (ctx.spec.lead_reader(point),)
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


METHOD = Method(
    name="smoothquant", summary="SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438): migrate activation outliers "
    "into the weights with a per-channel scale",
    settings=SmoothSettings,
    steps=(Step("smooth", block=smooth_step),),
    policies=(Policy("smoothquant", activation, describe),),
    presets={"smoothquant": dict(transforms=("smooth",), abits_policy="smoothquant", grid="symmetric",
                                 w_quantizer="rtn", w_range="minmax", w_group_size=0, w_clip=1.0, wbits=8, abits=8,
                                 smoothquant=dict(alpha=0.5, points="norm"))},
)
