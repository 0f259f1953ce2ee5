"""SpinQuant (Liu et al., ICLR 2025, arXiv 2405.16406): QuaRot's rotations with R1 and R2 learned.

The learning is model-level (rptq.spin_learn, run by the pipeline before layer 0 with R1 and the
per-layer R2 handed to residual_rotate and head_rotate); its per-block step here does nothing.
Quantizers, as the released code's W4A4KV4 scripts (scripts/2_eval_ptq.sh: --a_asym --k_asym
--v_asym --w_clip, clip ratios left at 1.0; eval_utils/main.py): every linear input per token,
asymmetric, dynamic; o_proj's input per token and head (its ``layer_groupsize = head_dim``, in place
of QuaRot's online Hadamard across heads); K and V per token x head, asymmetric; Q and the softmax
output FP; weights per output channel, symmetric, GPTQ after the clipping search (as QuaRot).
"""
from __future__ import annotations

from models.spec import KEY, VALUE
from quant.quantizer import QuantSpec

from ..config import QuantConfig
from ..context import BlockContext
from .quarot import _bits, describe_fixed, kv_spec


def spin_step(ctx: BlockContext) -> None:
    """R1 and R2 were learned before calibration (rptq.spin_learn); nothing per block."""


def _per_head(spec, point: str) -> bool:
    edge = spec.linear_edge(point)
    return edge is not None and edge.per_head


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    cfg, heads = ctx.cfg, ctx.spec.heads
    bits = _bits(cfg, role)
    if role in (KEY, VALUE):
        return kv_spec(ctx, bits), "minmax"
    groups = (heads.head_dim,) * heads.num_heads if _per_head(ctx.spec, point) else None
    return QuantSpec(bits=bits, group_sizes=groups, dynamic="token", grid="full", clip=cfg.rotation.act_clip), "minmax"


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    fixed = describe_fixed(cfg, role)
    if fixed is not None:
        return fixed
    bits = _bits(cfg, role)
    gran = "token x head" if _per_head(spec, point) else "token"
    return {"bits": bits, "granularity": f"{gran} dynamic, asymmetric, clip {cfg.rotation.act_clip}", "static": False}
