"""QuaRot (Ashkboos et al., NeurIPS 2024, arXiv 2404.00456): rotate so that no channel is an outlier.

R1, a randomized Hadamard on the whole residual stream, is a model step (rptq.residual_rotate, run
before the first layer's inputs are captured). Per
block: R2, a Hadamard of size head_dim folded into the value rows and the attention output's
consumer columns, plus QuaRot's online Hadamard across the heads there (``head_rotate``); R3, a
Hadamard on Q and K after RoPE, online (DuQuant's ``qk_rotate``); R4, a Hadamard of the MLP width
online at the MLP's second linear input with its transpose in the consumer's columns (``mlp_rotate``).
Quantizers: every linear input per token, symmetric on QuaRot's grid (quant.grid "quarot"), dynamic,
clip 0.9; K and V per token x head, asymmetric, clip 0.95; Q and the softmax output FP; weights per
output channel, symmetric, GPTQ after QuaRot's clipping search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from models.spec import KEY, LINEAR_IN, LN_OUT, VALUE
from quant.hadamard import orthogonal_mixer
from quant.quantizer import QuantSpec
from quant.transforms import BlockRotation

from ..config import FP, QuantConfig
from ..context import BlockContext, ModelContext
from ..fold import place_within_heads
from ..method_api import Method, Needs, Policy, Step, setting
from ..residual_rotate import rotate_residual

HEAD_ROTATION = "head_rotation"  # what a model step may hand head_rotate per layer (SpinQuant's learned R2)


@dataclass(frozen=True)
class QuaRotSettings:
    """QuaRot's rotations: R1 on the residual stream (the residual_rotate step), R2 per head
    (head_rotate), R4 at the MLP's second linear input (mlp_rotate); KV cache clipping."""

    namespace: ClassVar[str] = "quarot"
    kind: str = setting("hadamard", "residual_rotation", "R1 of the residual_rotate step (quarot): randomized "
                        "Hadamard (random orthogonal where no Hadamard of the width is built) or random orthogonal",
                        choices=("hadamard", "random"), needs=Needs(steps=("residual_rotate",)))
    kv_clip: float = 0.95  # QuaRot's K/V clipping ratio (per token x head, asymmetric)
    across_heads: bool = True  # head_rotate's online mixer across the heads at o_proj's input (QuaRot; not SpinQuant)


def residual_step(mctx: ModelContext) -> None:
    """R1 on the whole model before layer 0's inputs are captured (rptq.residual_rotate)."""
    mctx.report["residual_rotation"] = rotate_residual(mctx.model, mctx.adapter, mctx.cfg.of(QuaRotSettings).kind,
                                                       mctx.cfg.seed)


def head_matrix(ctx: BlockContext) -> tuple[torch.Tensor, str]:
    """R2 of this layer: SpinQuant's learned one when a model step gave one, else a Hadamard."""
    if ctx.given.get(HEAD_ROTATION) is not None:
        return ctx.given[HEAD_ROTATION], "learned"
    return orthogonal_mixer(ctx.spec.heads.head_dim, ctx.generator(salt=20), randomized=False)


def across_heads_matrix(ctx: BlockContext, n_heads: int) -> tuple[torch.Tensor, str]:
    """QuaRot's online mixer across ``n_heads`` heads, as a full-width matrix (channel h*d+i: head h)."""
    across, kind = orthogonal_mixer(n_heads, ctx.generator(salt=25), randomized=False)
    return torch.kron(across.contiguous(), torch.eye(ctx.spec.heads.head_dim, dtype=across.dtype)), kind


def mlp_matrix(ctx: BlockContext, index: int, width: int) -> tuple[torch.Tensor, str]:
    """R4 of linear edge number ``index``: a Hadamard of the width (random orthogonal where none is built)."""
    return orthogonal_mixer(width, ctx.generator(salt=40 + index), randomized=False)


def head_rotate_step(ctx: BlockContext) -> None:
    """R2: the same head_dim x head_dim Hadamard (SpinQuant: the layer's learned R2) on every head's
    value channels (folded), then, as QuaRot's online partial Hadamard at o_proj's input, a
    num_heads mixer across the heads (online, its transpose in o_proj's columns): together a
    full-width rotation, so no head's scale dominates the token's quantization range (R2 alone
    leaves each head's magnitude where it was). SpinQuant has no mixer (--method spinquant turns
    it off and quantizes o_proj's input per head instead)."""
    heads = ctx.spec.heads
    H, kind = head_matrix(ctx)
    for edge in ctx.spec.linear_edges:
        if not edge.per_head:
            continue
        where = place_within_heads(ctx.block, edge.point, BlockRotation(H), ctx.observers)
        ctx.placements.append({"point": edge.point, "transform": "rotation", "where": where, "step": "head_rotate"})
        decision = {"kind": kind, "block": heads.head_dim, "where": where}
        if ctx.cfg.of(QuaRotSettings).across_heads:
            n_heads = ctx.block.module(edge.consumer).in_features // heads.head_dim
            mix, across_kind = across_heads_matrix(ctx, n_heads)
            online = ctx.apply(edge.point, BlockRotation(mix), step="head_rotate")
            decision["across_heads"] = {"kind": across_kind, "heads": n_heads, "where": online}
        ctx.decisions.setdefault(edge.point, {})["head_rotate"] = decision


def mlp_rotate_step(ctx: BlockContext) -> None:
    """R4: a Hadamard of the full width (random orthogonal where none is built) online at every
    free linear edge's point (fc2 / down_proj input); its transpose goes into the consumer."""
    for i, edge in enumerate(ctx.spec.linear_edges):
        if edge.per_head:
            continue
        width = ctx.block.module(edge.consumer).in_features
        H, kind = mlp_matrix(ctx, i, width)
        where = ctx.apply(edge.point, BlockRotation(H), step="mlp_rotate")
        ctx.decisions.setdefault(edge.point, {})["mlp_rotate"] = {"kind": kind, "block": width, "where": where}


def _bits(cfg: QuantConfig, role: str) -> int:
    """Linear inputs, K and V at abits (only K and V with --only_quant_kv); Q and P stay FP."""
    if cfg.act_bits >= FP:
        return FP
    if cfg.only_quant_kv:
        return cfg.abits if role in (KEY, VALUE) else FP
    return cfg.abits if role in (LN_OUT, LINEAR_IN, KEY, VALUE) else FP


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    cfg = ctx.cfg
    bits = _bits(cfg, role)
    if role in (KEY, VALUE):
        return kv_spec(ctx, bits, role), "minmax"
    # QuaRot's grid: scale = clip * absmax / (2^(b-1) - 1) on codes -2^(b-1) .. 2^(b-1) - 1, so a clipped
    # token's negative side keeps the extra code (the toolkit's "symmetric" grid stops at -(2^(b-1) - 1)).
    return QuantSpec(bits=bits, dynamic="token", grid="quarot", clip=cfg.act_clip), "minmax"


def kv_spec(ctx: BlockContext, bits: int, role: str) -> QuantSpec:
    """K and V per token x head, asymmetric, dynamic, clipped at --kv_clip (QuaRot's and SpinQuant's). K's range
    always reaches 0 (their K quantizer takes min(x, 0) .. max(x, 0) per token x head); V's is its min .. max (their
    V quantizer's grouped path has no such floor)."""
    heads = ctx.spec.heads
    return QuantSpec(bits=bits, group_sizes=(heads.head_dim,) * heads.num_kv_heads, dynamic="token", grid="full",
                     clip=ctx.cfg.of(QuaRotSettings).kv_clip, zero_in_range=role == KEY)


def describe_fixed(cfg: QuantConfig, role: str) -> dict | None:
    """The description of an FP point or of K/V (shared with SpinQuant); None for the linear inputs."""
    bits = _bits(cfg, role)
    if bits >= FP:
        return {"bits": bits, "granularity": "none", "static": False}
    if role in (KEY, VALUE):
        return {"bits": bits, "granularity": f"token x head dynamic, asymmetric, clip {cfg.of(QuaRotSettings).kv_clip}",
                "static": False}
    return None


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    fixed = describe_fixed(cfg, role)
    if fixed is not None:
        return fixed
    bits = _bits(cfg, role)
    return {"bits": bits, "granularity": f"token dynamic, symmetric (codes -2^(b-1)..2^(b-1)-1), clip "
            f"{cfg.act_clip}", "static": False}


METHOD = Method(
    name="quarot", summary="QuaRot (Ashkboos et al., NeurIPS 2024, arXiv 2404.00456): Hadamard rotations of the "
    "residual stream (R1), the heads (R2), Q/K (R3) and the MLP (R4)",
    settings=QuaRotSettings,
    steps=(Step("residual_rotate", model=residual_step, whole_model=True),
           Step("head_rotate", block=head_rotate_step, online=True),
           Step("mlp_rotate", block=mlp_rotate_step, online=True)),
    policies=(Policy("quarot", activation, describe, uses_act_clip=True),),
    presets={"quarot": dict(transforms=("residual_rotate", "head_rotate", "qk_rotate", "mlp_rotate"),
                            abits_policy="quarot", grid="quarot", w_quantizer="gptq", w_range="minmax",
                            w_group_size=0, w_clip=1.0, w_clip_fit="search", act_clip=0.9, wbits=4, abits=4,
                            gptq_order="sequential", block_inputs="weights")},
    assumptions={
        "residual_rotate": (
            "QuaRot R1: a randomized Hadamard D H (random signs on H's rows) of the hidden width where one is built "
            "(m * 2^k, m from Paley I/II), else a random orthogonal matrix (QR of a Gaussian, sign-fixed), seeded by "
            "--seed; which one is in results.json",
            "QuaRot R1: the LM head is untied from the embeddings when they share a tensor (the final norm's gain goes "
            "into the head only); OPT's LayerNorms become RMSNorms on a zero-mean residual (SliceGPT), the final "
            "LayerNorm's shift a head bias"),
        "quarot": (
            "QuaRot: linear inputs on QuaRot's grid (quant.grid 'quarot'): scale clip * absmax / (2^(b-1) - 1), codes "
            "clamped to [-2^(b-1), 2^(b-1) - 1] as its sym_quant does; Q and the softmax output stay FP as in "
            "QuaRot's fake-quant code",
            "QuaRot: K and V per token x head (group = head_dim), asymmetric, clip 0.95, at --abits",
            "QuaRot: weights per output channel, symmetric, GPTQ (damp --percdamp, act-order only with --act_order as "
            "its --act_order; RTN with --w_quantizer "
            "rtn) with QuaRot's clipping search (its --w_clip: per row the shrink p = 1 - i/100, i < 80, of least sum "
            "|w_hat - w|^2.4; quant.clip_search), on QuaRot's grid (scale absmax / (2^(b-1) - 1), codes -2^(b-1) .. "
            "2^(b-1) - 1 as its WeightQuantizer's sym_quant: a clipped or GPTQ-updated weight may take the extra "
            "negative code)",
            "QuaRot: R2 and R4 are plain Hadamards (random orthogonal where none of the width is built), R2 the same "
            "on every head; the online mixer across heads at o_proj's input (QuaRot's partial Hadamard) is a "
            "Hadamard of order num_heads where one is built, else random orthogonal (SmolLM2-135M's 9 heads: random; "
            "QuaRot's code has no order-9 Hadamard)")},
)
