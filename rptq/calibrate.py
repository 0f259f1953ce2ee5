"""RPTQ on one decoder block: observe, cluster, fuse, quantize, produce the next inputs.

Two passes over the calibration set per block: one in full precision that gathers
every statistic (ranges for clustering and activation quantizers, GPTQ Hessians),
and one through the quantized block that yields the next block's inputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from models.block import QuantBlock
from models.spec import BlockSpec
from quant.quantizer import (FULL_PRECISION, ActQuantizer, QuantSpec, fake_quant, weight_group_params,
                             weight_params)

from .cluster import Layout, cluster_channels, cluster_heads, head_layout, range_features
from .config import QuantConfig, role_bits
from .reorder import fuse_linear_edge, fuse_norm_edge, fuse_qk_edge
from .stats import ChannelObserver


@dataclass
class BlockTiming:
    stats_s: float = 0.0
    kmeans_s: float = 0.0
    weights_s: float = 0.0
    output_s: float = 0.0
    passes: int = 0
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, layer_kwargs: dict, batch_size: int = 1) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        outputs[start:start + batch_size] = block(inputs[start:start + batch_size], **layer_kwargs)
    return outputs


def _head_features(ranges: tuple[torch.Tensor, torch.Tensor], heads_per_group: int, kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """(kv_heads, head_dim, 2 * heads_per_group) features of the heads sharing each kv head."""
    feats = range_features(*ranges).reshape(kv_heads, heads_per_group, head_dim, 2)
    return feats.permute(0, 2, 1, 3).reshape(kv_heads, head_dim, heads_per_group * 2)


def plan_layouts(spec: BlockSpec, observers: dict[str, ChannelObserver], cfg: QuantConfig) -> dict[str, Layout]:
    """Cluster every reorder point named in ``cfg.reorder``; returns activation point -> layout."""
    heads = spec.heads
    layouts: dict[str, Layout] = {}
    for edge in spec.norm_edges:
        if cfg.reorders(edge.reorder):
            feats = range_features(*observers[edge.point].ranges(cfg.metric))
            layouts[edge.point] = cluster_channels(feats, cfg.clusters[edge.reorder], cfg.seed)
    qk = spec.qk_edge
    if cfg.reorders(qk.reorder):
        q = _head_features(observers[qk.q_point].ranges(cfg.metric), heads.group, heads.num_kv_heads,
                           heads.head_dim)
        k = _head_features(observers[qk.k_point].ranges(cfg.metric), 1, heads.num_kv_heads, heads.head_dim)
        local = cluster_heads(torch.cat([q, k], dim=-1), heads, cfg.clusters[qk.reorder], cfg.seed,
                              rope=heads.rope)
        layouts[qk.q_point] = head_layout(local, heads.group, heads.head_dim)
        layouts[qk.k_point] = head_layout(local, 1, heads.head_dim)
    for edge in spec.linear_edges:
        if not cfg.reorders(edge.reorder):
            continue
        ranges = observers[edge.point].ranges(cfg.metric)
        if edge.per_head:
            feats = _head_features(ranges, heads.group, heads.num_kv_heads, heads.head_dim)
            local = cluster_heads(feats, heads, cfg.clusters[edge.reorder], cfg.seed, rope=False)
            layouts[edge.point] = head_layout(local, heads.group, heads.head_dim)
            layouts[edge.value_point] = head_layout(local, 1, heads.head_dim)
        else:
            layouts[edge.point] = cluster_channels(range_features(*ranges), cfg.clusters[edge.reorder], cfg.seed)
    return layouts


def apply_layouts(block: QuantBlock, spec: BlockSpec, layouts: dict[str, Layout]) -> None:
    for edge in spec.norm_edges:
        if edge.point in layouts:
            fuse_norm_edge(block, edge, layouts[edge.point])
    qk = spec.qk_edge
    if qk.q_point in layouts:
        fuse_qk_edge(block, qk, layouts[qk.q_point], layouts[qk.k_point])
    for edge in spec.linear_edges:
        if edge.point in layouts:
            fuse_linear_edge(block, edge, layouts[edge.point], layouts.get(edge.value_point))


def activation_quantizers(spec: BlockSpec, observers: dict[str, ChannelObserver], layouts: dict[str, Layout],
                          cfg: QuantConfig) -> nn.ModuleDict:
    taps = {}
    for point, role in spec.points.items():
        groups = layouts[point].sizes if point in layouts else None
        qspec = QuantSpec(bits=role_bits(cfg, role), group_sizes=groups, dynamic=cfg.a_dynamic)
        cmin = cmax = None
        if qspec.enabled and not qspec.dynamic:
            cmin, cmax = observers[point].ranges(cfg.metric)
        taps[point] = ActQuantizer(qspec, cmin, cmax)
    return nn.ModuleDict(taps)


def _last_reader(spec: BlockSpec, name: str, point: str) -> bool:
    """Whether ``name`` is the last linear (in quantization order) reading activation ``point``."""
    readers = [n for n, p in spec.linear_inputs.items() if p == point]
    return readers[-1] == name


@torch.no_grad()
def quantize_weights(block: QuantBlock, spec: BlockSpec, observers: dict[str, ChannelObserver],
                     layouts: dict[str, Layout], cfg: QuantConfig) -> None:
    bits = cfg.weight_bits
    for name, point in spec.linear_inputs.items():
        linear = block.module(name)
        groups = layouts[point].sizes if point in layouts else None
        if cfg.w_quantizer == "gptq":
            scale, zero = weight_group_params(linear.weight.data.float(), groups, bits)
            q = observers[point].gptq.quantize(linear.weight.data, scale, zero, bits, group_sizes=groups,
                                               blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        else:
            scale, zero = weight_params(linear.weight.data.float(), groups, bits)
            q = fake_quant(linear.weight.data.float(), scale, zero, bits)
        linear.weight.data = q.to(linear.weight.dtype)
        if cfg.w_quantizer == "gptq" and _last_reader(spec, name, point):
            observers[point].gptq.free()  # its n x n factor is dead weight from here on


def calibrate_block(block: QuantBlock, inputs: torch.Tensor, layer_kwargs: dict,
                    cfg: QuantConfig) -> tuple[torch.Tensor, BlockTiming]:
    """Reorder and quantize ``block`` in place; return its quantized outputs on ``inputs``."""
    spec = block.spec
    timing = BlockTiming()
    quantize_w = cfg.weight_bits < FULL_PRECISION
    hessian_points = set(spec.linear_inputs.values()) if quantize_w and cfg.w_quantizer == "gptq" else set()

    t0 = time.perf_counter()
    observers = {p: ChannelObserver(hessian=p in hessian_points) for p in spec.points}
    block.taps = nn.ModuleDict(observers)
    run_block(block, inputs, layer_kwargs)
    timing.passes += 1
    t1 = time.perf_counter()

    layouts = plan_layouts(spec, observers, cfg)
    apply_layouts(block, spec, layouts)
    for point, layout in layouts.items():
        observers[point].permute(layout.perm)
    timing.layouts = {p: lay.sizes for p, lay in layouts.items()}
    t2 = time.perf_counter()

    if quantize_w:
        quantize_weights(block, spec, observers, layouts, cfg)
    t3 = time.perf_counter()

    block.taps = activation_quantizers(spec, observers, layouts, cfg).to(inputs.device)
    del observers
    outputs = run_block(block, inputs, layer_kwargs)
    timing.passes += 1
    t4 = time.perf_counter()
    timing.stats_s, timing.kmeans_s, timing.weights_s, timing.output_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    return outputs, timing
