"""DuQuant (Lin et al., NeurIPS 2024, arXiv 2406.01721): at every linear input, SmoothQuant-style
smoothing (folded; the smooth step), then online x -> x R1 P R2 (block-diagonal greedy rotations
around the largest outliers and a zigzag permutation that balances outlier mass over blocks),
with the inverse in the consumers' weights; Q and K rotated by a Hadamard of size head_dim so
Q K^T is unchanged; per-token dynamic asymmetric activations (clip 0.9) and per-channel weights
(clip 0.8).

``rotation kind hadamard | random`` replaces the searched (R1, P, R2) by a plain block Hadamard
or random orthogonal block (the usual rotation baseline, without smoothing in its preset)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from models.spec import KEY, QUERY, VALUE
from quant.quantizer import QuantSpec
from quant.rotation import (duquant_base, duquant_transform, largest_pow2_block, random_orthogonal,
                            sylvester_hadamard)
from quant.transforms import BlockRotation, Permutation

from ..config import FP, QuantConfig, linear_and_qkv_bits
from ..context import BlockContext
from ..method_api import Method, Needs, Policy, Step, non_negative, setting

ROTATE = Needs(steps=("rotate",))


def _power_of_two(value: int) -> str | None:
    if value < 2:
        return "must be at least 2"
    if value & (value - 1):  # largest_pow2_block would silently use a smaller power of two
        return f"must be a power of two such as {1 << (value.bit_length() - 1)}"
    return None


@dataclass(frozen=True)
class RotationSettings:
    """DuQuant's online rotations at the linear inputs (and the plain-rotation baseline)."""

    namespace: ClassVar[str] = "duquant"
    kind: str = setting("duquant", "rotation", "online rotation at the linear inputs: DuQuant's (R1, zigzag, R2), "
                        "block Hadamard, random", choices=("duquant", "hadamard", "random"), needs=ROTATE)
    block_size: int = setting(128, "rotation_block", "power of two (rotate step; default 128); a width it does not "
                              "divide uses the largest power of two that does", type=int, check=_power_of_two,
                              needs=ROTATE)
    steps: int = setting(256, "rotation_steps", "DuQuant's greedy steps (rotate step; default 256)", type=int,
                         check=non_negative, needs=ROTATE)
    permute: bool = setting(True, "no_permute", "DuQuant without the zigzag permutation (and R2)", const=False,
                            needs=ROTATE)
    outlier_index: str = setting("official", "outlier_index", "DuQuant's greedy outlier index: the released code's "
                                 "rule or the paper's", choices=("official", "paper"), needs=ROTATE)
    sample_tokens: int = 2048  # calibration token rows the search sees (DuQuant: one 2048-token sequence)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _range_ratio(x: torch.Tensor) -> float:
    """max_j m_j / mean_j m_j with m_j the per-channel absmax: how uneven the channels are."""
    m = x.abs().amax(0)
    return float(m.max() / m.mean().clamp(min=1e-12))


def rotate_step(ctx: BlockContext) -> None:
    settings = ctx.cfg.of(RotationSettings)
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
    bits, clip = _bits(cfg, role), cfg.act_clip
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
    clip = "" if role == VALUE else f", clip {cfg.act_clip}"
    gran = "token x head" if role in (QUERY, KEY, VALUE) else "token"
    return {"bits": bits, "granularity": f"{gran} dynamic{clip}", "static": False}


def _linear_input_sample(cfg: QuantConfig, spec) -> dict[str, int]:
    return {point: cfg.of(RotationSettings).sample_tokens for point in spec.linear_inputs.values()}


def _qk_sample(cfg: QuantConfig, spec) -> dict[str, int]:  # mixed channels: later steps read the sample
    return {point: cfg.of(RotationSettings).sample_tokens for point in (spec.qk_edge.q_point, spec.qk_edge.k_point)}


DUQUANT_QUANTIZERS = dict(abits_policy="duquant", grid="full", w_quantizer="rtn", w_range="minmax", w_group_size=0,
                          w_clip=0.8, act_clip=0.9, wbits=4, abits=4)
METHOD = Method(
    name="duquant", summary="DuQuant (Lin et al., NeurIPS 2024, arXiv 2406.01721): smoothing, then online block "
    "rotations around the outliers with a zigzag permutation between them",
    settings=RotationSettings,
    steps=(Step("rotate", block=rotate_step, online=True, token_sample=_linear_input_sample),
           Step("qk_rotate", block=qk_rotate_step, online=True, token_sample=_qk_sample)),
    policies=(Policy("duquant", activation, describe, uses_act_clip=True),),
    presets={"duquant": dict(transforms=("smooth", "rotate", "qk_rotate"), **DUQUANT_QUANTIZERS,
                             smoothquant=dict(alpha=0.6, points="all", floor=1e-2, weights="lead"),
                             duquant=dict(kind="duquant"), block_inputs="fp"),
             "rotation": dict(transforms=("rotate", "qk_rotate"), **DUQUANT_QUANTIZERS, duquant=dict(kind="hadamard"))},
    assumptions={"rotate": ("DuQuant: the rotation search runs on a seeded sample of calibration token rows of the "
                            "point (--rotation_block, 2048 rows) from the FP pass, not on the quantized block's "
                            "activations for the mean input sequence as the official code does (measured: "
                            "docs/methods/duquant.md, Parity)",)},
)
