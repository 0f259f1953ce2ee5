"""SpinQuant (Liu et al., ICLR 2025, arXiv 2405.16406): QuaRot's rotations with R1 and R2 learned.

The learning is a model step (rptq.spin_learn, before layer 0): it folds the norms, learns R1 and the
per-layer R2, rotates the residual stream by R1 in place of residual_rotate's Hadamard and hands each
layer's R2 to head_rotate.
Quantizers, as the released code's W4A4KV4 scripts (scripts/2_eval_ptq.sh: --a_asym --k_asym
--v_asym --w_clip, clip ratios left at 1.0; eval_utils/main.py): every linear input per token,
asymmetric, dynamic; o_proj's input per token and head (its ``layer_groupsize = head_dim``, in place
of QuaRot's online Hadamard across heads); K and V per token x head, asymmetric; Q and the softmax
output FP; weights per output channel, symmetric, GPTQ after the clipping search (as QuaRot).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from common.errors import UserError
from models.spec import KEY, VALUE
from quant.quantizer import QuantSpec

from ..config import QuantConfig
from ..context import BlockContext, ModelContext
from ..method_api import Method, Needs, Policy, Step, at_least_one, non_negative, positive, setting
from ..spin_learn import rotate_model
from .quarot import HEAD_ROTATION, _bits, describe_fixed, kv_spec

SPIN = Needs(steps=("spin_rotate",))
LEARNED = "spin_rotations"  # a caller may hand the model step rotations learned already (ModelContext.given)


@dataclass(frozen=True)
class SpinSettings:
    """SpinQuant's learning of R1 and R2 (the spin_rotate step): Cayley SGD steps, the peak learning
    rate of its cosine schedule, and how many calibration windows it sees (one per step, cycled)."""

    namespace: ClassVar[str] = "spinquant"
    # SmolLM2-135M, 512-token windows: ~45 s a step on the 2-core dev box (README)
    steps: int = setting(8, "spin_steps", "SpinQuant's Cayley SGD steps learning R1/R2 (spin_rotate step; default 8; "
                         "paper 100)", type=int, check=non_negative, needs=SPIN)
    lr: float = setting(1.5, "spin_lr", "SpinQuant's peak learning rate, cosine (default 1.5)", type=float,
                        check=positive, needs=SPIN)
    samples: int = setting(4, "spin_samples", "calibration windows the learning sees, one per step (default 4, at "
                           "most --nsamples)", type=int, check=at_least_one, needs=SPIN)


def check(settings: SpinSettings, cfg: QuantConfig, run) -> SpinSettings:
    """The windows it sees are at most the calibration's: the default shrinks to --nsamples, a given value
    above it is refused."""
    if "spin_samples" not in run.given:
        return dataclasses.replace(settings, samples=min(settings.samples, run.nsamples))
    if "spin_rotate" in cfg.transforms and settings.samples > run.nsamples:
        raise UserError(f"--spin_samples {settings.samples} exceeds the {run.nsamples} calibration windows "
                        "(--nsamples); lower it or raise --nsamples")
    return settings


def spin_step(mctx: ModelContext) -> None:
    """Fold the norms, learn R1 and each layer's R2 (rptq.spin_learn), rotate the residual stream by the learned
    R1 (in place of residual_rotate's Hadamard); head_rotate takes each layer's R2."""
    done, learned = rotate_model(mctx.model, mctx.adapter, mctx.windows, mctx.cfg, mctx.cfg.of(SpinSettings),
                                 mctx.device, mctx.given.get(LEARNED))
    mctx.report.update(residual_rotation=done, spin_rotation=learned.report)
    if learned.r2 is not None:
        mctx.per_layer[HEAD_ROTATION] = learned.r2


def _per_head(spec, point: str) -> bool:
    edge = spec.linear_edge(point)
    return edge is not None and edge.per_head


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    cfg, heads = ctx.cfg, ctx.spec.heads
    bits = _bits(cfg, role)
    if role in (KEY, VALUE):
        return kv_spec(ctx, bits, role), "minmax"
    groups = (heads.head_dim,) * heads.num_heads if _per_head(ctx.spec, point) else None
    return QuantSpec(bits=bits, group_sizes=groups, dynamic="token", grid="full", clip=cfg.act_clip), "minmax"


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    fixed = describe_fixed(cfg, role)
    if fixed is not None:
        return fixed
    bits = _bits(cfg, role)
    gran = "token x head" if _per_head(spec, point) else "token"
    return {"bits": bits, "granularity": f"{gran} dynamic, asymmetric, clip {cfg.act_clip}", "static": False}


METHOD = Method(
    name="spinquant", summary="SpinQuant (Liu et al., ICLR 2025, arXiv 2405.16406): QuaRot's rotations with R1 and "
    "R2 learned by Cayley SGD on the fake-quantized model",
    settings=SpinSettings, check=check,
    steps=(Step("spin_rotate", model=spin_step, requires=("residual_rotate",), replaces=("residual_rotate",),
                whole_model=True),),
    policies=(Policy("spinquant", activation, describe, uses_act_clip=True),),
    presets={"spinquant": dict(transforms=("residual_rotate", "spin_rotate", "head_rotate", "qk_rotate", "mlp_rotate"),
                               abits_policy="spinquant", grid="quarot", w_quantizer="gptq", w_range="minmax",
                               w_group_size=0, w_clip=1.0, w_clip_fit="search", act_clip=1.0, wbits=4, abits=4,
                               gptq_order="sequential", block_inputs="weights",
                               quarot=dict(kv_clip=1.0, across_heads=False))},
    assumptions={
        "spin_rotate": (
            "SpinQuant: R1 and one R2 per layer learned by Cayley SGD (quant/cayley.py: exact Cayley factor by a "
            "linear solve, step min(lr, 1/||A||_1) as the released SGDG, no momentum, no random QR "
            "re-orthonormalisation), cosine schedule from --spin_lr 1.5; one calibration window per step cycling over "
            "--spin_samples (the paper: 100 steps of 8 x 2048-token WikiText-2 windows)",
            "SpinQuant: R1 starts from residual_rotate's seeded randomized Hadamard, each R2 from a seeded randomized "
            "Hadamard of head_dim (the released code's random_hadamard_matrix); the same R2 on every head of a layer "
            "(GQA: each query head's o_proj columns use its K/V head's R2)",
            "SpinQuant: during learning, with GPTQ weights afterwards (the default), the weights stay full precision "
            "(the released README: rotations for GPTQ are learned on W16A4KV4); with --w_quantizer rtn they are RTN "
            "per output channel on the run's grid without the clipping search (the released code runs its search "
            "every step; too slow on a CPU); activations, K and V by the method's policy, all with straight-through "
            "rounding; R3/R4 fixed Hadamards in the forward; the learning computes in float32 (the released code in "
            "bf16)"),
        "spinquant": (
            "SpinQuant: linear inputs per token, asymmetric, dynamic, clip 1.0 (its scripts' --a_asym, a_clip_ratio "
            "1.0); on the full grid [min, max] of each token (the released code widens the range to include 0)",
            "SpinQuant: o_proj's input per token x head (its eval code sets the group size to head_dim there) and no "
            "online Hadamard across heads (QuaRot's across_heads setting off), unlike QuaRot",
            "SpinQuant: K and V per token x head, asymmetric, clip 1.0 (--k_asym --v_asym, groups of head_dim); Q and "
            "the softmax output FP",
            "SpinQuant: weights per output channel, symmetric, GPTQ with QuaRot's clipping search (its --w_clip) after "
            "learning, on QuaRot's weight grid (codes -2^(b-1)..2^(b-1)-1), as QuaRot's preset here")},
)
