"""RPTQ: cluster channels by their ranges, reorder them so clusters are contiguous, and give
each cluster its own quantization range (Yuan et al., arXiv 2304.01089)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from models.spec import PROBS
from quant.quantizer import QuantSpec
from quant.transforms import Permutation

from ..cluster import CLUSTER_ORDERS, cluster_channels, cluster_heads, head_layout, range_features
from ..config import FP, QuantConfig, point_reorder, role_bits
from ..context import BlockContext
from ..method_api import Method, Needs, Policy, Step, at_least_one, setting

REORDER = Needs(steps=("reorder",))


def _reorder_digits(value: str) -> str | None:
    if any(c not in "12345" for c in value) or len(set(value)) != len(value):
        return "takes distinct digits 1-5 such as 12345 or 14"
    return None


def _clusters(point: str, default: int):
    return setting(default, f"{point}_clusters", f"clusters at {point} (default {default}; R2/R3 per head)", type=int,
                   check=at_least_one, needs=Needs(custom=lambda cfg: reorders(cfg, point),
                                                   what=f"{point} in --reorder (the reorder step)"))


@dataclass(frozen=True)
class RPTQSettings:
    """Which reorder points are clustered, into how many clusters, on which features."""

    namespace: ClassVar[str] = "rptq"
    reorder: str = setting("12345", "reorder", 'reorder points to cluster, e.g. 12345 (default), 1, or "" for none',
                           check=_reorder_digits, needs=REORDER)
    R1_clusters: int = _clusters("R1", 32)
    R2_clusters: int = _clusters("R2", 4)
    R3_clusters: int = _clusters("R3", 4)
    R4_clusters: int = _clusters("R4", 32)
    R5_clusters: int = _clusters("R5", 32)
    kmeans_features: str = setting("minmax", "kmeans_features", "what k-means clusters: global min/max (reference) "
                                   "or the --metric ranges", choices=("minmax", "metric"), needs=REORDER)
    kmeans_seed: int = setting(0, "kmeans_seed", "k-means' random_state (default 0, the reference's); the "
                               "calibration windows still follow --seed", type=int, needs=REORDER)
    cluster_order: str = setting("label", "cluster_order", "order of the clusters in a reordered layout: k-means' "
                                 "label order (default, the reference's) or their mean feature; only GPTQ's column "
                                 "order depends on it", choices=CLUSTER_ORDERS, needs=REORDER)
    calib_softmax: str = setting("grid", "calib_softmax", "the softmax output in the statistics pass: on its "
                                 "1/255 grid (default, as the reference calibrates) or unrounded (fp)",
                                 choices=("grid", "fp"),
                                 needs=Needs(custom=lambda cfg: cfg.abits_policy in ("rptq", "uniform"),
                                             what="--abits_policy rptq or uniform"))

    def clusters(self, point: str) -> int:
        return getattr(self, f"{point}_clusters")


def reorders(cfg: QuantConfig, point: str) -> bool:
    """Whether reorder point 'R1'..'R5' is clustered."""
    return "reorder" in cfg.transforms and point[1] in cfg.of(RPTQSettings).reorder


def _feature_ranges(ctx: BlockContext, point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) that k-means sees: the running global extremes over every calibration
    token (the reference, whatever --metric is) or the --metric ranges (``kmeans_features metric``); with the
    softmax grid on in calibration, measured before it acts, on the unquantized layer, as the reference does."""
    obs = (ctx.feature_observers or ctx.observers)[point]
    if ctx.cfg.of(RPTQSettings).kmeans_features == "minmax" or ctx.cfg.metric in ("mse", "layer_mse"):
        return obs.channel_minmax()
    channels = obs.maxes[0].shape[-1]
    return obs.group_ranges(ctx.cfg.metric, (1,) * channels)


def _head_features(ranges, heads_per_group: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(kv_heads, head_dim, 2 * heads_per_group) features of the heads sharing each kv head."""
    feats = range_features(*ranges).reshape(kv_heads, heads_per_group, head_dim, 2)
    return feats.permute(0, 2, 1, 3).reshape(kv_heads, head_dim, heads_per_group * 2)


def qk_feature_ranges(ctx: BlockContext):
    """R2's per-channel ranges of q and k; q as q_proj's output, before the 1/sqrt(d) scaling an
    architecture may apply at its tap (the reference hooks q_proj itself)."""
    qk, heads = ctx.spec.qk_edge, ctx.spec.heads
    qmin, qmax = _feature_ranges(ctx, qk.q_point)
    if qk.q_prescaled:
        unscale = heads.head_dim ** 0.5
        qmin, qmax = qmin * unscale, qmax * unscale
    return (qmin, qmax), _feature_ranges(ctx, qk.k_point)


def reorder_step(ctx: BlockContext) -> None:
    """Cluster every reorder point named in ``--reorder`` and fold the permutations (R1..R5)."""
    cfg, spec = ctx.cfg, ctx.spec
    rptq = cfg.of(RPTQSettings)
    heads, clusters, seed, order = spec.heads, rptq.clusters, rptq.kmeans_seed, rptq.cluster_order
    for edge in spec.norm_edges:
        if reorders(cfg, edge.reorder):
            layout = cluster_channels(range_features(*_feature_ranges(ctx, edge.point)), clusters(edge.reorder),
                                      seed, order=order)
            ctx.apply(edge.point, Permutation(layout.perm), step="reorder")
            ctx.groups[edge.point] = layout.sizes
    qk = spec.qk_edge
    if reorders(cfg, qk.reorder):
        q_ranges, k_ranges = qk_feature_ranges(ctx)
        q = _head_features(q_ranges, heads.group, heads.num_kv_heads, heads.head_dim)
        k = _head_features(k_ranges, 1, heads.num_kv_heads, heads.head_dim)
        local = cluster_heads(torch.cat([q, k], dim=-1), heads, clusters(qk.reorder), seed, rope=heads.rope,
                              order=order)
        q_layout, k_layout = head_layout(local, heads.group, heads.head_dim), head_layout(local, 1, heads.head_dim)
        ctx.apply_qk(Permutation(q_layout.perm), Permutation(k_layout.perm), step="reorder")
        ctx.groups[qk.q_point], ctx.groups[qk.k_point] = q_layout.sizes, k_layout.sizes
    for edge in spec.linear_edges:
        if not reorders(cfg, edge.reorder):
            continue
        ranges = _feature_ranges(ctx, edge.point)
        if edge.per_head:
            feats = _head_features(ranges, heads.group, heads.num_kv_heads, heads.head_dim)
            local = cluster_heads(feats, heads, clusters(edge.reorder), seed, rope=False, order=order)
            layout, value = head_layout(local, heads.group, heads.head_dim), head_layout(local, 1, heads.head_dim)
            ctx.apply(edge.point, Permutation(layout.perm), producer_form=Permutation(value.perm), step="reorder")
            ctx.groups[edge.point], ctx.groups[edge.value_point] = layout.sizes, value.sizes
        else:
            layout = cluster_channels(range_features(*ranges), clusters(edge.reorder), seed, order=order)
            ctx.apply(edge.point, Permutation(layout.perm), step="reorder")
            ctx.groups[edge.point] = layout.sizes


def dynamic_kind(cfg: QuantConfig) -> str | None:
    if not cfg.a_dynamic:
        return None
    return "sequence" if cfg.a_dynamic_method == "per_cluster" else "token"


def activation(ctx: BlockContext, point: str, role: str) -> tuple[QuantSpec, str]:
    """The rptq and uniform policies: per-cluster ranges (static under --metric, or dynamic);
    the softmax output on RPTQ's fixed [0, 1] grid of 1/255 steps."""
    cfg = ctx.cfg
    bits = role_bits(cfg, role)
    if role == PROBS:
        return QuantSpec(bits=bits, unit_grid=bits < FP), cfg.metric
    return QuantSpec(bits=bits, group_sizes=ctx.groups.get(point), dynamic=dynamic_kind(cfg), grid=cfg.grid), cfg.metric


def fixed(cfg: QuantConfig, point: str, role: str) -> QuantSpec | None:
    """The softmax grid acts in the statistics pass too (``--calib_softmax grid``): the reference rounds P
    before its calibration-mode check, so P @ V's ranges and o_proj's Hessian see the rounded P."""
    if role != PROBS or role_bits(cfg, role) >= FP or cfg.of(RPTQSettings).calib_softmax != "grid":
        return None
    return QuantSpec(bits=role_bits(cfg, role), unit_grid=True)


def describe(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    bits = role_bits(cfg, role)
    reorder = point_reorder(spec).get(point)
    if bits >= FP:
        gran = "none"
    elif role == PROBS:
        gran = "fixed [0,1] grid (1/255)"
    elif reorder and reorders(cfg, reorder):
        per_head = reorder in ("R2", "R3")
        gran = f"cluster({reorder}={cfg.of(RPTQSettings).clusters(reorder)}{' per head' if per_head else ''})"
    else:
        gran = "tensor"
    if bits < FP and role != PROBS and cfg.a_dynamic:
        gran += " per sequence" if cfg.a_dynamic_method == "per_cluster" else " per token"
    return {"bits": bits, "granularity": gran, "static": bits < FP and (role == PROBS or not cfg.a_dynamic)}


METHOD = Method(
    name="rptq", summary="RPTQ (Yuan et al., arXiv 2304.01089): reorder channels into clusters, one range per cluster",
    settings=RPTQSettings,
    # the extra pass only when k-means runs (not for the per-tensor baseline, --reorder "")
    steps=(Step("reorder", block=reorder_step, unquantized_features=lambda cfg: bool(cfg.of(RPTQSettings).reorder)),),
    policies=(Policy("rptq", activation, describe, fixed=fixed), Policy("uniform", activation, describe, fixed=fixed)),
    presets={"rptq": dict(transforms=("reorder",), abits_policy="rptq", grid="reference", w_quantizer="gptq",
                          w_range="minmax", w_group_size=0, w_clip=1.0, block_inputs="weights")},
)
