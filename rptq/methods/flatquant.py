"""FlatQuant (Sun et al., ICML 2025, arXiv 2410.09426): at every linear input a learned invertible affine
transform, x -> (x * d) (L kron R), with its inverse folded into the readers' weights, and learned clipping of
weights (LWC, ``--w_clip learned``) and activations (LAC), trained per block on the block-output MSE against
the full-precision block with AdamW and a cosine schedule; every block trains on the full-precision model's
activations (``block_inputs`` fp).

Where, from the block declaration (the official code's llama_utils, read for its facts): a Kronecker transform
with a per-channel scale d at each norm-fed input (d folds into the norm's gain) and at each free linear edge's
input (d folds into the ``scalable`` producer's rows: SwiGLU's up, OPT's fc1); at the attention output, a
head_dim transform Tv folded into the value rows (the V cache is quantized in its basis) times a heads x heads
transform To online, so o_proj's input sees To kron Tv; a head_dim transform Tk on K and its inverse transpose on
Q after RoPE (Q K^T unchanged, the K cache in Tk's basis). Each factor is U diag(s) V^T with U, V orthogonal
(Cayley map), so its inverse is U diag(1/s) V^T, exact. Weights are RTN per output channel on QuaRot's
symmetric grid (GPTQ with ``--w_quantizer gptq``); activations per token, symmetric; K/V per token and head,
asymmetric; Q and the softmax output stay FP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import UserError
from models.spec import KEY, LINEAR_IN, LN_OUT, QUERY, VALUE
from quant.quantizer import QuantSpec
from quant.rotation import random_orthogonal
from quant.transforms import BlockLinear, Kronecker, Scale, kronecker_apply, kronecker_sizes

from .. import methods as registry
from ..block_learning import LearnedClipQuant, RowClips, Schedule, ste_weight, train_block, training_weight_spec
from ..config import FP, QuantConfig
from ..context import BlockContext
from ..fold import place_within_heads
from ..method_api import Method, Needs, Policy, Step, at_least_one, non_negative, positive, setting

FLAT = Needs(steps=("flat_transform",))
MIN_SCALE = 1e-5  # the per-channel scales stay positive (they fold as a Scale; the official init floors them here)


def _unit(value) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


@dataclass(frozen=True)
class FlatQuantSettings:
    """The learning of the flat_transform step (FlatQuant's --epochs, --flat_lr, --cali_bsz, --diag_alpha,
    --cali_trans, --add_diag, --lac; its --lwc is ``--w_clip learned``)."""

    namespace: ClassVar[str] = "flatquant"
    epochs: int = setting(2, "flat_epochs", "FlatQuant's training epochs per block (default 2, sized for a CPU; "
                          "the paper: 15)", type=int, check=non_negative, needs=FLAT)
    lr: float = setting(5e-3, "flat_lr", "FlatQuant's learning rate of the transforms (clipping factors: 10x), "
                        "cosine to 1e-3 of it", type=float, check=positive, needs=FLAT)
    batch: int = setting(4, "flat_batch", "calibration windows per step (FlatQuant's --cali_bsz)", type=int,
                         check=at_least_one, needs=FLAT)
    diag_alpha: float = setting(0.3, "flat_diag_alpha", "migration strength of the per-channel scales' "
                                "SmoothQuant-style start", type=float, check=_unit, needs=FLAT)
    learn_transforms: bool = setting(True, "no_flat_learning", "keep the Kronecker factors at their random "
                                     "orthogonal start (FlatQuant without --cali_trans)", const=False, needs=FLAT)
    diag: bool = setting(True, "no_flat_diag", "no per-channel scales (FlatQuant without --add_diag)", const=False,
                         needs=FLAT)
    lac: bool = setting(True, "no_lac", "no learned activation clipping (FlatQuant without --lac)", const=False,
                        needs=FLAT)
    a_asym: bool = setting(False, "a_asym", "asymmetric per-token activations (FlatQuant's --a_asym; default "
                           "symmetric)", const=True, needs=Needs(policies=("flatquant",)))
    scale_param: str = setting("linear", "flat_scale_param", "how the per-channel scales learn: linear (FlatQuant: "
                               "AdamW steps of the scale itself) or log (steps of its logarithm: relative changes, "
                               "for channels whose scale starts near the step size)", choices=("linear", "log"),
                               needs=FLAT)


class Factor(nn.Module):
    """One invertible factor U diag(s) V^T: U and V orthogonal as U0 Cayley(A) with A skew, around seeded random
    orthogonal starts U0, V0; s starts at 1. ``pair()``: (the matrix, its inverse transpose U diag(1/s) V^T)."""

    def __init__(self, n: int, gen: torch.Generator, learn: bool):
        super().__init__()
        self.register_buffer("u0", random_orthogonal(n, gen).float())
        self.register_buffer("v0", random_orthogonal(n, gen).float())
        self.a_u = nn.Parameter(torch.zeros(n, n), requires_grad=learn)
        self.a_v = nn.Parameter(torch.zeros(n, n), requires_grad=learn)
        self.s = nn.Parameter(torch.ones(n), requires_grad=learn)

    @staticmethod
    def _orthogonal(base: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        skew = a - a.t()
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return base.to(a.dtype) @ torch.linalg.solve(eye - skew, eye + skew)

    def pair(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        u = self._orthogonal(self.u0, self.a_u.to(dtype))
        v = self._orthogonal(self.v0, self.a_v.to(dtype))
        s = self.s.to(dtype)
        return (u * s) @ v.t(), (u / s) @ v.t()


class Site(nn.Module):
    """The learned transforms of one activation point. kind "kron": (x * d) (L kron R) with d optional; "heads":
    the attention output, To (heads, ``left``) kron Tv (head_dim, ``right``), Tv on the values; "qk": Tk
    (``right``) on K, its inverse transpose on Q."""

    def __init__(self, kind: str, point: str, left: int | None, right: int, gen, learn: bool, diag=None,
                 log_scale: bool = False):
        super().__init__()
        self.kind, self.point, self.log_scale = kind, point, log_scale
        self.left = None if left is None else Factor(left, gen, learn)
        self.right = Factor(right, gen, learn)
        self.diag = None if diag is None else nn.Parameter(diag.log() if log_scale else diag)

    def scale(self) -> torch.Tensor | None:
        if self.diag is None:
            return None
        return self.diag.exp() if self.log_scale else self.diag.clamp(min=MIN_SCALE)

    def factor_params(self) -> list[nn.Parameter]:
        factors = [f for f in (self.left, self.right) if f is not None]
        return [p for f in factors for p in f.parameters() if p.requires_grad] + \
            ([self.diag] if self.diag is not None else [])


def _quantized(ctx: BlockContext, point: str) -> bool:
    return registry.policy(ctx.cfg).activation(ctx, point, ctx.spec.points[point])[0].enabled


def _sites(ctx: BlockContext, settings: FlatQuantSettings) -> list[Site]:
    """A Kronecker site at every norm-fed and free linear input, the heads site at the attention output, the
    Q/K site where K or Q is quantized; factors seeded by the run's seed and the layer."""
    spec = ctx.spec
    gen, hd = ctx.generator(salt=60), spec.heads.head_dim
    sites = []

    def kron(point: str, width: int, diag_ok: bool) -> Site:
        diag = None
        if settings.diag and diag_ok:  # SmoothQuant-style start (FlatQuant's sq_style): w^(1-a) / x^a
            x_max = ctx.observers[point].absmax().clamp(min=MIN_SCALE)
            w_max = torch.cat([ctx.block.module(n).weight.detach().float().cpu() for n in spec.readers(point)]
                              ).abs().amax(0)
            diag = (w_max.pow(1 - settings.diag_alpha) / x_max.pow(settings.diag_alpha)).clamp(min=MIN_SCALE)
        left, right = kronecker_sizes(width)
        return Site("kron", point, left, right, gen, settings.learn_transforms, diag, settings.scale_param == "log")

    for edge in spec.norm_edges:
        sites.append(kron(edge.point, spec.hidden_size, True))
    for edge in spec.linear_edges:
        width = ctx.block.module(edge.consumer).in_features
        if edge.per_head:
            sites.append(Site("heads", edge.point, width // hd, hd, gen, settings.learn_transforms))
        else:
            sites.append(kron(edge.point, width, bool(edge.scalable)))
    qk = spec.qk_edge
    if _quantized(ctx, qk.k_point) or _quantized(ctx, qk.q_point):
        sites.append(Site("qk", qk.k_point, None, hd, gen, settings.learn_transforms))
    return sites


def _per_block(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x blockdiag(m, ..., m)."""
    n = m.shape[0]
    return (x.reshape(*x.shape[:-1], -1, n) @ m.to(x.dtype)).reshape(x.shape)


class _Tap(nn.Module):
    """A training tap: the point's transform (a function of the sites' parameters), then its quantizer."""

    def __init__(self, transform, quant: nn.Module | None):
        super().__init__()
        self.transform, self.quant = transform, quant

    def forward(self, x):
        if self.transform is not None:
            x = self.transform(x)
        return x if self.quant is None else self.quant(x)


def _transforms(ctx: BlockContext, sites: list[Site]) -> dict:
    """point -> x -> x M, for every point a site transforms during training (Tv at the values, To at the
    attention output; Tk at K, Tk^-T at Q)."""
    out = {}
    for site in sites:
        if site.kind == "kron":
            out[site.point] = lambda x, s=site: kronecker_apply(
                x if s.scale() is None else x * s.scale(), s.left.pair()[0], s.right.pair()[0])
        elif site.kind == "heads":  # Tv is in the value rows (see _training_weights)
            eye = torch.eye(site.right.u0.shape[0], device=site.right.u0.device)
            out[site.point] = lambda x, s=site, eye=eye: kronecker_apply(x, s.left.pair()[0], eye)
        else:
            out[ctx.spec.qk_edge.q_point] = lambda x, s=site: _per_block(x, s.right.pair()[1])
            out[site.point] = lambda x, s=site: _per_block(x, s.right.pair()[0])
    return out


def _training_taps(ctx: BlockContext, sites: list[Site], lac: bool) -> tuple[dict, list]:
    """Per point the transform, then the run's activation quantizer with its clipping learned (LAC) or fixed;
    returns (taps, [(point, quantizer with a learned clip)])."""
    transforms, policy = _transforms(ctx, sites), registry.policy(ctx.cfg)
    taps, lacs = {}, []
    for point, role in ctx.spec.points.items():
        qspec, _ = policy.activation(ctx, point, role)
        quant = None
        if qspec.enabled:
            if qspec.dynamic != "token":
                raise UserError(f"--method flatquant learns through per-token dynamic activation quantizers; "
                                f"--abits_policy {ctx.cfg.abits_policy} quantizes {point} otherwise (use "
                                "--abits_policy flatquant)")
            quant = LearnedClipQuant(qspec, learn=lac)
            if quant.clip is not None:
                lacs.append((point, quant))
        if point in transforms or quant is not None:
            taps[point] = _Tap(transforms.get(point), quant)
    return taps, lacs


def _training_weights(ctx: BlockContext, sites: list[Site], row_clips: dict):
    """``weights()`` for train_block: every reader's columns by its point's inverse transform, the value rows
    (and bias) by Tv as they will be stored, then (weights quantized) the learned clipping and straight-through
    rounding."""
    spec, cfg = ctx.spec, ctx.cfg
    by_point = {s.point: s for s in sites if s.kind != "qk"}
    value_rows = {n: s for s in sites if s.kind == "heads" for n in spec.linear_edge(s.point).producers}
    base = {n: ctx.block.module(n).weight.detach().float() for n in spec.linear_inputs}
    bias = {n: b.detach().float() for n in value_rows if (b := ctx.block.module(n).bias) is not None}
    wspecs = {n: training_weight_spec(cfg, w.shape[1], ctx.groups.get(spec.linear_inputs[n])) for n, w in base.items()}

    def weights() -> dict:
        out = {}
        for name, w in base.items():
            site = by_point.get(spec.linear_inputs[name])
            if site is not None:  # W (M^-T): kron: (W / d)(L^-T kron R^-T); heads: W (To^-T kron Tv^-T)
                scale = site.scale()
                w = kronecker_apply(w if scale is None else w / scale, site.left.pair()[1], site.right.pair()[1])
            if name in value_rows:  # rows Tv^T W per head, bias b Tv: the V cache is quantized in Tv's basis
                tv = value_rows[name].right.pair()[0]
                w = _per_block(w.t(), tv).t()
                if name in bias:
                    out[f"layer.{name}.bias"] = _per_block(bias[name], tv)
            if cfg.weight_bits < FP:
                up, low = row_clips[name]() if name in row_clips else (None, None)
                w = ste_weight(w, wspecs[name], up, low)
            out[f"layer.{name}.weight"] = w
        return out
    return weights


def flat_transform_step(ctx: BlockContext) -> None:
    """Train the block's transforms (and LWC, LAC) on its calibration inputs against its FP outputs, then place
    them: scales folded, Kronecker factors online with their inverses in the readers, Tv in the value rows."""
    settings, cfg = ctx.cfg.of(FlatQuantSettings), ctx.cfg
    device = next(ctx.block.layer.parameters()).device
    sites = [s.to(device) for s in _sites(ctx, settings)]
    lwc = cfg.w_clip_fit == "learned" and cfg.weight_bits < FP
    row_clips = {n: RowClips(ctx.block.module(n).weight.shape[0]).to(device) for n in ctx.spec.linear_inputs} \
        if lwc else {}
    taps, lacs = _training_taps(ctx, sites, settings.lac)
    clip_params = [p for m in row_clips.values() for p in m.parameters()] + [p for _, q in lacs for p in q.parameters()]
    groups = [g for g in ({"params": [p for s in sites for p in s.factor_params()], "lr": settings.lr},
                          {"params": clip_params, "lr": settings.lr * 10}) if g["params"]]
    report = train_block(ctx, taps, _training_weights(ctx, sites, row_clips), groups,
                         Schedule(settings.epochs, settings.batch))
    with torch.no_grad():
        _place(ctx, sites)
        for name, module in row_clips.items():
            ctx.weight_clips[name] = tuple(f.detach().cpu() for f in module())
        for point, quant in lacs:
            up, low = quant.factors()
            ctx.decisions.setdefault(point, {}).update(lac=float(up), lac_low=float(low))
    ctx.decisions["flat_transform"] = report


def _place(ctx: BlockContext, sites: list[Site]) -> None:
    """The trained transforms in place, built in float64 (each factor and its inverse transpose)."""
    for site in sites:
        right, right_it = site.right.pair(torch.float64)
        if site.kind == "qk":
            ctx.apply_qk(BlockLinear(right_it, right), BlockLinear(right, right_it), step="flat_transform")
            continue
        left, left_it = site.left.pair(torch.float64)
        if site.kind == "kron":
            if site.diag is not None:
                d = site.scale().double()
                ctx.decisions.setdefault(site.point, {}).update(scale_min=float(d.min()), scale_max=float(d.max()))
                ctx.apply(site.point, Scale(1 / d), step="flat_transform")
            ctx.apply(site.point, Kronecker(left, right, left_it, right_it), step="flat_transform")
            continue
        where = place_within_heads(ctx.block, site.point, BlockLinear(right, right_it), ctx.observers)
        ctx.placements.append({"point": site.point, "transform": "block_linear", "where": where,
                               "step": "flat_transform"})
        eye = torch.eye(right.shape[0], dtype=right.dtype)
        ctx.apply(site.point, Kronecker(left, eye, left_it, eye), step="flat_transform")


def flat_bits(cfg: QuantConfig):
    """role -> bits: linear inputs, K and V at --abits (only K and V with --only_quant_kv); Q and P FP."""
    def bits(role: str) -> int:
        if cfg.act_bits >= FP:
            return FP
        if cfg.only_quant_kv:
            return cfg.abits if role in (KEY, VALUE) else FP
        return cfg.abits if role in (LN_OUT, LINEAR_IN, KEY, VALUE) else FP
    return bits


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    """Per token, symmetric on QuaRot's grid (asymmetric with --a_asym); K and V per token x head, asymmetric;
    every range reaching 0 (FlatQuant's quantizer takes min(x, 0) .. max(x, 0)), its maximum and minimum clipped by
    LAC's two learned factors."""
    bits, heads = flat_bits(ctx.cfg)(role), ctx.spec.heads
    lac = ctx.decisions.get(point, {})
    clip, clip_low = lac.get("lac", 1.0), lac.get("lac_low")
    if role in (KEY, VALUE):
        return QuantSpec(bits=bits, group_sizes=(heads.head_dim,) * heads.num_kv_heads, dynamic="token", grid="full",
                         clip=clip, zero_in_range=True, clip_low=clip_low), "minmax"
    grid = "full" if ctx.cfg.of(FlatQuantSettings).a_asym else "quarot"
    return QuantSpec(bits=bits, dynamic="token", grid=grid, clip=clip, zero_in_range=True, clip_low=clip_low), "minmax"


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    bits = flat_bits(cfg)(role)
    if bits >= FP:
        return {"bits": bits, "granularity": "none", "static": False}
    clip = ", learned clip" if cfg.of(FlatQuantSettings).lac else ""
    if role in (KEY, VALUE):
        return {"bits": bits, "granularity": f"token x head dynamic, asymmetric{clip}", "static": False}
    grid = "asymmetric" if cfg.of(FlatQuantSettings).a_asym else "symmetric (codes -2^(b-1)..2^(b-1)-1)"
    return {"bits": bits, "granularity": f"token dynamic, {grid}{clip}", "static": False}


METHOD = Method(
    name="flatquant", summary="FlatQuant (Sun et al., ICML 2025, arXiv 2410.09426): learned Kronecker-factored "
    "affine transforms at every linear input, learned weight and activation clipping",
    settings=FlatQuantSettings,
    steps=(Step("flat_transform", block=flat_transform_step, online=True, fits_weight_clips=True),),
    policies=(Policy("flatquant", activation, describe),),
    presets={"flatquant": dict(transforms=("flat_transform",), abits_policy="flatquant", grid="quarot",
                               w_quantizer="rtn", w_range="minmax", w_group_size=0, w_clip=1.0, w_clip_fit="learned",
                               wbits=4, abits=4, block_inputs="fp")},
    assumptions={
        "flat_transform": (
            "FlatQuant: one learned activation clipping pair (a factor on each token's maximum, one on its minimum, "
            "the range reaching 0 first, as the official quantizer) per activation point, shared by the linears "
            "reading it (the official code learns a pair per linear)",
            "FlatQuant: each orthogonal factor is U0 Cayley(A) with A skew, around a seeded random orthogonal start "
            "U0 (the official code parametrises the matrix by torch's Cayley map); AdamW with torch's defaults, "
            "cosine to 1e-3 of the learning rate, no warm-up, in fp32 (the official code in fp16/bf16 autocast)",
            "FlatQuant: the per-channel scales stay >= 1e-5 while they learn (they fold as positive scales: into the "
            "norm's gain, SwiGLU's up rows, OPT's fc1 rows before the ReLU)",
            "FlatQuant: the K transform (Tk on K, Tk^-T on Q) is learned whenever K or Q is quantized; the V "
            "transform and the heads transform at o_proj's input always"),
        "flatquant": (
            "FlatQuant: linear inputs per token, symmetric on QuaRot's grid (codes -2^(b-1)..2^(b-1)-1); K and V per "
            "token x head (groups of head_dim; the official scripts' groups of 128 are one head on LLaMA), "
            "asymmetric on each group's [min, max] (the official range includes 0); Q and the softmax output FP",
            "FlatQuant: weights per output channel, symmetric on QuaRot's grid, RTN (GPTQ with --w_quantizer gptq) "
            "after the transforms, with the learned clipping (--w_clip learned) when on")},
)
