"""FPTQ (Li et al., arXiv 2308.15987), W4A8: logarithmic activation equalization (LAE) and a
layerwise choice of activation granularity by the calibrated range r = max|X| of each point:
r <= v0: per-tensor static INT8; v0 < r <= v1 and fed by a norm: LAE then per-tensor static;
otherwise per-token dynamic INT8. Spec and ASSUMPTIONs: shared/methods/fptq.md."""
from __future__ import annotations

import torch

from models.spec import KEY, LINEAR_IN, LN_OUT, VALUE
from quant.quantizer import QuantSpec

from ..config import FP, QuantConfig
from ..context import BlockContext
from quant.transforms import Scale

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
    settings = ctx.cfg.fptq
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
        return min(cfg.fptq.kv_bits, cfg.abits) if cfg.fptq.kv_bits < FP else FP
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
