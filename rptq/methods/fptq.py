"""FPTQ (Li et al., arXiv 2308.15987), W4A8: logarithmic activation equalization (LAE) and a
layerwise choice of activation granularity by the calibrated range r = max|X| of each point:
r <= v0: per-tensor static INT8; v0 < r <= v1 and fed by a norm: LAE then per-tensor static;
otherwise per-token dynamic INT8. The ASSUMPTIONs are declared below."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.errors import UserError
from models.spec import KEY, LINEAR_IN, LN_OUT, VALUE
from quant.quantizer import QuantSpec
from quant.transforms import Scale

from ..config import FP, QuantConfig
from ..context import BlockContext
from ..method_api import Method, Needs, Policy, Step, setting

BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class FPTQSettings:
    """FPTQ's layerwise activation rule: r = max|X| <= v0 static; <= v1 (norm-fed) LAE + static;
    else per-token dynamic. KV: per-token, per-head dynamic at kv_bits (16 = off)."""

    namespace: ClassVar[str] = "fptq"
    v0: float = setting(15.0, "fptq_v0", "FPTQ's static threshold (lae step; default 15)", type=float,
                        needs=Needs(steps=("lae",)))
    v1: float = setting(150.0, "fptq_v1", "FPTQ's LAE threshold, >= v0 (lae step; default 150)", type=float,
                        needs=Needs(steps=("lae",)))
    kv_bits: int = setting(8, "kv_bits", "FPTQ's K/V cache bits (fptq policy; default 8; 16: off)", type=int,
                           choices=BITS, needs=Needs(policies=("fptq",)))


def check(settings: FPTQSettings, cfg: QuantConfig, run) -> None:
    if not 0 <= settings.v0 <= settings.v1:
        raise UserError(f"--fptq_v0 and --fptq_v1 need 0 <= v0 <= v1 (got {settings.v0}, {settings.v1})")
    if cfg.abits_policy == "fptq" and "lae" not in cfg.transforms:
        raise UserError("--abits_policy fptq routes each point by the lae step's decisions; add lae to --transforms")

LAE_FLOOR = 1e-5
STATIC, LAE_STATIC, DYNAMIC = "static", "lae+static", "dynamic"


def lae_scale(absmax: torch.Tensor) -> torch.Tensor:
    """s_j = m_j / log2(2 + m_j), floored: after x / s, channel j's maximum is log2(2 + m_j)."""
    m = absmax.float()
    return (m / torch.log2(2 + m)).clamp(min=LAE_FLOOR)


def strategy(r: float, norm_fed: bool, v0: float, v1: float) -> str:
    """The paper's rule; a point in (v0, v1] that no norm feeds cannot take LAE and goes dynamic
    (ASSUMPTION, the safe reading of the spec)."""
    if r <= v0:
        return STATIC
    if r <= v1 and norm_fed:
        return LAE_STATIC
    return DYNAMIC


def lae_step(ctx: BlockContext) -> None:
    """Decide every linear input's strategy on the unmodified FP statistics, then fold LAE."""
    settings = ctx.cfg.of(FPTQSettings)
    for point in dict.fromkeys(ctx.spec.linear_inputs.values()):
        absmax = ctx.observers[point].absmax()
        r = float(absmax.max())
        choice = strategy(r, ctx.spec.norm_edge(point) is not None, settings.v0, settings.v1)
        decision = {"r": r, "strategy": choice}
        if choice == LAE_STATIC:
            decision["where"] = ctx.apply(point, Scale(lae_scale(absmax)), step="lae")
            decision["r_after"] = float(ctx.observers[point].absmax().max())
        ctx.decisions.setdefault(point, {}).update(decision)


def _bits(cfg: QuantConfig, role: str) -> int:
    if cfg.act_bits >= FP:
        return FP
    if role in (KEY, VALUE):
        kv_bits = cfg.of(FPTQSettings).kv_bits
        return min(kv_bits, cfg.abits) if kv_bits < FP else FP
    if cfg.only_quant_kv:
        return FP
    return cfg.abits if role in (LN_OUT, LINEAR_IN) else FP


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    cfg = ctx.cfg
    bits = _bits(cfg, role)
    if role in (KEY, VALUE):  # the quantized KV cache: per token and head, dynamic (ASSUMPTION)
        heads = ctx.spec.heads
        return QuantSpec(bits=bits, group_sizes=(heads.head_dim,) * heads.num_kv_heads, dynamic="token",
                         grid="symmetric"), "minmax"
    dynamic = ctx.decisions.get(point, {}).get("strategy") == DYNAMIC
    return QuantSpec(bits=bits, dynamic="token" if dynamic else None, grid="symmetric"), "minmax"


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    bits = _bits(cfg, role)
    if bits >= FP:
        return {"bits": bits, "granularity": "none", "static": False}
    if role in (KEY, VALUE):
        return {"bits": bits, "granularity": "token x head symmetric", "static": False}
    return {"bits": bits, "granularity": "layerwise: tensor static (r <= v1) or token dynamic, symmetric",
            "static": None}


METHOD = Method(
    name="fptq", summary="FPTQ (Li et al., arXiv 2308.15987): W4A8 with logarithmic activation equalization and a "
    "layerwise activation granularity",
    settings=FPTQSettings, check=check,
    steps=(Step("lae", block=lae_step),),
    policies=(Policy("fptq", activation, describe),),
    presets={"fptq": dict(transforms=("lae",), abits_policy="fptq", grid="full", w_quantizer="rtn", w_range="minmax",
                          w_group_size=128, w_clip=1.0, wbits=4, abits=8)},
    assumptions={
        "lae": ("FPTQ: the strategy of each point is decided on the unmodified FP statistics, before LAE",
                "FPTQ: a point with v0 < r <= v1 that no norm feeds (out_proj/o_proj, fc2/down_proj) runs per-token "
                "dynamic"),
        "fptq": ("FPTQ: K and V quantized per token and head, dynamic, symmetric INT8 (--kv_bits); Q, softmax and "
                 "the attention products stay FP",
                 "FPTQ: activations symmetric INT8, static scales = calibration max|X| / 127 with no clipping search",
                 "FPTQ: weights INT4 asymmetric min-max RTN in groups of 128 (--w_group_size)")},
)
