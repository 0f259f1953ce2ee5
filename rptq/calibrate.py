"""One decoder block: observe, transform, quantize, produce the next inputs.

Two passes over the calibration set per block: one in full precision that gathers every
statistic (ranges, GPTQ Hessians, token samples) and the block's FP outputs, and one
through the quantized block that yields the next block's inputs and, against the FP
outputs, the block's quantization error. Between them the method's transform steps run
on the statistics (re-expressed, never re-measured), then weights and activation
quantizers are built.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from models.block import QuantBlock
from models.execution import run_block
from models.spec import PROBS
from quant.quantizer import FULL_PRECISION, ActQuantizer, expand_groups
from quant.threads import single_thread_on_cpu
from quant.search import mse_clip_ranges

from . import methods
from .config import QuantConfig
from .context import BlockContext
from .weights import quantize_weights
from .stats import ChannelObserver, sample_per_call

ERROR_SAMPLE_TOKENS = 256  # token rows kept per linear input to measure weight-only error
LAYER_MSE_WINDOWS = 4  # calibration windows the layer_mse search scores on
LAYER_MSE_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


@dataclass
class BlockTiming:
    stats_s: float = 0.0
    transform_s: float = 0.0
    weights_s: float = 0.0
    output_s: float = 0.0
    passes: int = 0
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # point -> channel groups (clusters)
    decisions: dict[str, dict] = field(default_factory=dict)
    placements: list[dict] = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    ranges: dict = field(default_factory=dict)  # point -> before/after channel ranges (--act_dist_plot)


def _observers(spec, cfg: QuantConfig, samples: int, layer: int) -> dict[str, ChannelObserver]:
    """What the FP pass records at each point. Softmax outputs need nothing (a fixed grid or FP)."""
    quantize_w = cfg.weight_bits < FULL_PRECISION
    hessian = quantize_w and cfg.w_quantizer in ("gptq", "gptqt")
    linear_points = set(spec.linear_inputs.values())
    qk_points = {spec.qk_edge.q_point, spec.qk_edge.k_point}
    observers = {}
    for i, (point, role) in enumerate(spec.points.items()):
        if role == PROBS:
            continue
        tokens = ERROR_SAMPLE_TOKENS if point in linear_points else 0
        if cfg.metric == "mse":
            tokens = max(tokens, 2048)
        if "rotate" in cfg.transforms and point in linear_points:
            tokens = max(tokens, cfg.rotation.sample_tokens)
        if "qk_rotate" in cfg.transforms and point in qk_points:  # mixed channels: later steps read the sample
            tokens = max(tokens, cfg.rotation.sample_tokens)
        observers[point] = ChannelObserver(hessian=hessian and point in linear_points,
                                           sample_per_call=sample_per_call(tokens, samples),
                                           seed=cfg.seed * 1009 + layer * 101 + i)
    return observers


class MeasuredTap(nn.Module):
    """A quantizer that also sums its squared error and its input's energy (the quantized pass).

    The quantizer (elementwise ops and range extremes) and the squares give the same bits on any
    number of threads, so they run on one: on this busy 2-core machine two threads' hand-offs cost
    more than the work (the pass took 9.0 s vs 4.7 s on 8 windows). The sums' rounding depends on
    the thread count, so they keep the caller's. One scratch tensor serves both sums (the attention
    probabilities are 12 x 512 x 512 per window); d * d is d.pow(2) bit for bit."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer, self.err, self.energy = quantizer, 0.0, 0.0

    def forward(self, x):
        with single_thread_on_cpu(x.device):
            y = self.quantizer(x)
            xf = x.float()
            sq = y.float() - xf
            sq.mul_(sq)
        self.err += float(sq.sum())
        with single_thread_on_cpu(x.device):
            torch.mul(xf, xf, out=sq)
        self.energy += float(sq.sum())
        return y


def activation_quantizers(ctx: BlockContext) -> dict[str, ActQuantizer]:
    policy = methods.policy(ctx.cfg)
    taps = {}
    for point, role in ctx.spec.points.items():
        qspec, metric = policy.activation(ctx, point, role)
        if not qspec.static:
            taps[point] = ActQuantizer(qspec)
            continue
        obs = ctx.observers[point]
        channels = obs.maxes[0].shape[-1]
        sizes = qspec.group_sizes or (channels,)
        gmin, gmax = obs.group_ranges(metric, sizes)
        if metric == "mse":
            gmin, gmax = mse_clip_ranges(obs.sample(), gmin, gmax, sizes, qspec.bits, qspec.grid)
        cmin, cmax = expand_groups(gmin, sizes), expand_groups(gmax, sizes)
        taps[point] = ActQuantizer(qspec, cmin, cmax)
        taps[point].ranges = (cmin, cmax)  # what layer_mse's search clips
    return taps


@torch.no_grad()
def layer_mse_search(block: QuantBlock, taps: dict, inputs: torch.Tensor, fp_out: torch.Tensor,
                     layer_kwargs: dict) -> dict[str, float]:
    """--metric layer_mse: per static point, in forward order, the clipping ratio of its ranges
    that minimises the block's output MSE on the first few calibration windows (greedy)."""
    k = min(LAYER_MSE_WINDOWS, inputs.shape[0])
    chosen = {}

    def loss() -> float:
        return float((run_block(block, inputs[:k], layer_kwargs) - fp_out[:k]).float().pow(2).mean())

    block.taps = nn.ModuleDict(taps)
    for point, tap in taps.items():
        if not tap.spec.static:
            continue
        cmin, cmax = tap.ranges
        best = (loss(), 1.0, tap)
        for ratio in LAYER_MSE_RATIOS[1:]:
            candidate = ActQuantizer(dataclasses.replace(tap.spec, clip=ratio), cmin, cmax)
            block.taps[point] = candidate
            value = loss()
            if value < best[0]:
                best = (value, ratio, candidate)
        block.taps[point] = taps[point] = best[2]
        chosen[point] = best[1]
    return chosen


def _sqnr_db(rel_mse: float) -> float:
    return math.inf if rel_mse <= 0 else -10 * math.log10(rel_mse)


def _range_snapshot(observers: dict) -> dict:
    return {p: tuple(t.clone() for t in obs.channel_minmax()) for p, obs in observers.items() if obs.maxes}


def _plot_ranges(before: dict, ctx: BlockContext, taps: dict) -> dict:
    """Per transformed point: ranges before (original order) and after (the new basis), the clusters
    and each cluster's quantization range, as eval.plots expects them."""
    out = {}
    kinds: dict[str, list[str]] = {}
    for placed in ctx.placements:
        kinds.setdefault(placed["point"], []).append("reorder" if placed["step"] == "reorder" else placed["transform"])
    for point, steps in kinds.items():
        if point not in before or not ctx.observers[point].maxes:
            continue
        after = ctx.observers[point].channel_minmax()
        data = {"before_min": before[point][0], "before_max": before[point][1], "after_min": after[0],
                "after_max": after[1], "_transform": "+".join(dict.fromkeys(steps))}
        sizes = ctx.groups.get(point)
        tap = taps.get(point)
        if sizes is not None and getattr(tap, "ranges", None) is not None:
            starts = torch.tensor((0,) + sizes[:-1]).cumsum(0)
            data.update(group_sizes=torch.tensor(sizes), group_min=tap.ranges[0][starts].float(),
                        group_max=tap.ranges[1][starts].float())
        out[point] = data
    return out


def calibrate_block(block: QuantBlock, inputs: torch.Tensor, layer_kwargs: dict, cfg: QuantConfig,
                    layer: int = 0, keep_ranges: bool = False,
                    side_by_side: bool = True) -> tuple[torch.Tensor, BlockTiming]:
    """Transform and quantize ``block`` in place; return its quantized outputs on ``inputs``.
    ``side_by_side``: see :func:`quantize_weights` (False out of core, where memory binds)."""
    spec = block.spec
    timing = BlockTiming()
    t0 = time.perf_counter()
    observers = _observers(spec, cfg, inputs.shape[0], layer)
    block.taps = nn.ModuleDict({p: observers.get(p, nn.Identity()) for p in spec.points})
    fp_out = run_block(block, inputs, layer_kwargs)
    timing.passes += 1
    t1 = time.perf_counter()

    ctx = BlockContext(block, observers, cfg, layer)
    before = _range_snapshot(observers) if keep_ranges else {}
    for name in cfg.transforms:
        methods.step(name)(ctx)
    t2 = time.perf_counter()

    weight_errors = quantize_weights(ctx, side_by_side) if cfg.weight_bits < FULL_PRECISION else {}
    t3 = time.perf_counter()

    taps = activation_quantizers(ctx)
    if keep_ranges:
        timing.ranges = _plot_ranges(before, ctx, taps)
    del observers, ctx.observers
    if cfg.metric == "layer_mse":
        timing.decisions["layer_mse_clip"] = layer_mse_search(block, taps, inputs, fp_out, layer_kwargs)
    measured = {p: MeasuredTap(t) for p, t in taps.items()}
    block.taps = nn.ModuleDict(measured).to(inputs.device)
    outputs = run_block(block, inputs, layer_kwargs)
    block.taps = nn.ModuleDict({p: m.quantizer for p, m in measured.items()})
    timing.passes += 1
    t4 = time.perf_counter()

    rel = float((outputs.float() - fp_out.float()).pow(2).sum() / fp_out.float().pow(2).sum().clamp(min=1e-30))
    timing.errors = {"block_rel_mse": rel, "block_sqnr_db": _sqnr_db(rel), "weights": weight_errors,
                     "points": {p: m.err / max(m.energy, 1e-30) for p, m in measured.items()
                                if m.quantizer.spec.enabled}}
    timing.layouts = dict(ctx.groups)
    timing.decisions.update(ctx.decisions)
    timing.placements = ctx.placements
    timing.stats_s, timing.transform_s, timing.weights_s, timing.output_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    return outputs, timing
