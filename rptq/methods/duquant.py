"""DuQuant (Lin et al., NeurIPS 2024, arXiv 2406.01721): at every linear input, SmoothQuant-style
smoothing (folded; the smooth step), then online x -> x R1 P R2 (block-diagonal greedy rotations
around the largest outliers and a zigzag permutation that balances outlier mass over blocks),
with the inverse in the consumers' weights; Q and K rotated by a Hadamard of size head_dim so
Q K^T is unchanged; per-token dynamic asymmetric activations (clip 0.9) and per-channel weights
(clip 0.8). Spec and the official code's traps: shared/methods/duquant.md.

``rotation kind hadamard | random`` replaces the searched (R1, P, R2) by a plain block Hadamard
or random orthogonal block (the usual rotation baseline, without smoothing in its preset)."""
from __future__ import annotations

import torch

from models.spec import KEY, QUERY, VALUE
from quant.quantizer import QuantSpec
from quant.rotation import (duquant_base, duquant_transform, largest_pow2_block, random_orthogonal,
                            sylvester_hadamard)

from ..config import FP, QuantConfig, linear_and_qkv_bits
from ..context import BlockContext
from quant.transforms import BlockRotation, Permutation


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _range_ratio(x: torch.Tensor) -> float:
    """max_j m_j / mean_j m_j with m_j the per-channel absmax: how uneven the channels are."""
    m = x.abs().amax(0)
    return float(m.max() / m.mean().clamp(min=1e-12))


def rotate_step(ctx: BlockContext) -> None:
    settings = ctx.cfg.rotation
    for i, point in enumerate(dict.fromkeys(ctx.spec.linear_inputs.values())):
        obs = ctx.observers[point]
        channels = obs.maxes[0].shape[-1]
        block = largest_pow2_block(channels, settings.block_size)
        before = obs.sample()
        gen = ctx.generator(salt=i)
        if settings.kind == "duquant":
            r1, perm, r2 = duquant_transform(before, block, settings.steps, settings.outlier_index, gen,
                                             permute=settings.permute)
            ctx.apply(point, BlockRotation(r1), step="rotate")
            if perm is not None:
                ctx.apply(point, Permutation(perm), step="rotate")
                ctx.apply(point, BlockRotation(r2), step="rotate")
        else:
            R = sylvester_hadamard(block) if settings.kind == "hadamard" else random_orthogonal(block, gen)
            ctx.apply(point, BlockRotation(R), step="rotate")
        after = obs.sample()
        ctx.decisions.setdefault(point, {})["rotate"] = {
            "kind": settings.kind, "block": block, "range_ratio_before": _range_ratio(before),
            "range_ratio_after": _range_ratio(after), "absmax_before": float(before.abs().max()),
            "absmax_after": float(after.abs().max())}


def qk_rotate_step(ctx: BlockContext) -> None:
    """Q and K times the same orthogonal head_dim x head_dim matrix per head (a Hadamard where
    head_dim is a power of two, else DuQuant's uniform-row base), online: Q H (K H)^T = Q K^T."""
    R = qk_matrix(ctx.spec.heads.head_dim)
    ctx.apply_qk(BlockRotation(R), BlockRotation(R), step="qk_rotate")


def qk_matrix(head_dim: int) -> torch.Tensor:
    """The qk_rotate step's matrix (SpinQuant's learning puts the same one in its forward)."""
    return sylvester_hadamard(head_dim) if _is_pow2(head_dim) else duquant_base(head_dim)


_bits = linear_and_qkv_bits


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    """Per-token dynamic asymmetric quantization of every linear input (clip --act_clip); Q, K per
    token and head (clipped), V per token and head (unclipped); the softmax output stays FP."""
    cfg = ctx.cfg
    bits, clip = _bits(cfg, role), cfg.rotation.act_clip
    heads = ctx.spec.heads
    if role in (QUERY, KEY, VALUE):
        count = heads.num_heads if role == QUERY else heads.num_kv_heads
        return QuantSpec(bits=bits, group_sizes=(heads.head_dim,) * count, dynamic="token", grid="full",
                         clip=1.0 if role == VALUE else clip), "minmax"
    return QuantSpec(bits=bits, dynamic="token", grid="full", clip=clip), "minmax"


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    bits = _bits(cfg, role)
    if bits >= FP:
        return {"bits": bits, "granularity": "none", "static": False}
    clip = "" if role == VALUE else f", clip {cfg.rotation.act_clip}"
    gran = "token x head" if role in (QUERY, KEY, VALUE) else "token"
    return {"bits": bits, "granularity": f"{gran} dynamic{clip}", "static": False}
