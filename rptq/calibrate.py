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
from models.spec import PROBS
from quant.quantizer import (FULL_PRECISION, ActQuantizer, expand_groups, fake_quant, weight_group_params,
                             weight_params)
from quant.gptq import _single_thread_on_cpu
from quant.search import mse_clip_ranges

from . import methods
from .config import QuantConfig
from .context import BlockContext
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


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, layer_kwargs: dict, batch_size: int = 1) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        out = block(inputs[start:start + batch_size], **layer_kwargs)
        with _single_thread_on_cpu(outputs.device):  # a copy: same bits on one thread, no hand-offs
            outputs[start:start + batch_size] = out
    return outputs


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
        with _single_thread_on_cpu(x.device):
            y = self.quantizer(x)
            xf = x.float()
            sq = y.float() - xf
            sq.mul_(sq)
        self.err += float(sq.sum())
        with _single_thread_on_cpu(x.device):
            torch.mul(xf, xf, out=sq)
        self.energy += float(sq.sum())
        return y


def activation_quantizers(ctx: BlockContext) -> dict[str, ActQuantizer]:
    policy = methods.policy(ctx.cfg)
    taps = {}
    for point, role in ctx.spec.points.items():
        qspec, metric = policy.activation(ctx, point, role)
        if not qspec.enabled or qspec.dynamic is not None or qspec.unit_grid:
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


def _binary_weight(coded, device) -> tuple[torch.Tensor, dict]:
    """The binary-coded weight as the packed format rebuilds it (alpha and offset in fp32, summed in a
    fixed order), so that a saved checkpoint reproduces the run bit for bit; and its codes."""
    from quant.packing import PackedBinary

    alpha, offset = coded.alpha.float().cpu(), coded.offset.float().cpu()
    packed = PackedBinary.from_planes(coded.bits.cpu(), alpha, offset, coded.group_sizes)
    codes = {"kind": "binary", "planes": coded.bits.cpu(), "alpha": alpha, "offset": offset,
             "group_sizes": coded.group_sizes}
    return packed.dequantize(torch.float32).to(device), codes


def _gptq_readers(ctx: BlockContext, point: str, wspec) -> dict[str, tuple]:
    """GPTQ of every linear reading ``point`` in one sweep: name -> (q, scale, zero).

    The readers share the input's inverse Hessian, and GPTQ treats each output row on its own
    given it, so their rows stacked (q/k/v: 3 x 768 rows of OPT-125m) take one column loop instead
    of one per linear: the loop's cost is thousands of small ops, nearly independent of the rows.
    Each row sees the same arithmetic as alone (checked bit for bit by bench_calibration's digest)."""
    names = ctx.spec.readers(point)
    weights = [ctx.block.module(n).weight.data.float() for n in names]
    with _single_thread_on_cpu(weights[0].device):  # extremes and rounding: exact on one thread, and far
        params = [weight_group_params(W, wspec.group_sizes, wspec.bits, wspec) for W in weights]  # cheaper
    scale, zero = torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])
    q = ctx.observers[point].gptq.quantize(torch.cat(weights), scale, zero, wspec.bits,
                                           group_sizes=wspec.group_sizes, blocksize=ctx.cfg.blocksize,
                                           percdamp=ctx.cfg.percdamp, grid=wspec.grid)
    rows = [W.shape[0] for W in weights]
    return {n: (qn.clone(), *p) for n, qn, p in zip(names, q.split(rows), params)}  # own storage each


def _gptq_sweeps(ctx: BlockContext) -> dict[str, tuple]:
    """Every input point's GPTQ sweep (:func:`_gptq_readers`): name -> (q, scale, zero).

    A sweep runs on one thread (its column loop is thousands of small ops), so on a CPU with a
    spare core two sweeps run side by side, the largest input first (OPT-125m shape: fc2's 3072
    columns beside q/k/v, out_proj and fc1). Every operation inside a sweep is single-threaded
    either way -- the pool starts after torch and LAPACK are limited to one thread -- so the
    results are those of the sequential order, bit for bit (bench_calibration's digest). The results
    wait for the caller: one layer's quantized weights, and the sweeps' working copies side by side.
    Out of core, where memory binds, the caller sweeps one input at a time instead (returns {} here
    then, as with one worker)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    spec = ctx.spec
    jobs = []
    for point in dict.fromkeys(spec.linear_inputs.values()):
        columns = ctx.block.module(spec.readers(point)[0]).weight.shape[1]
        jobs.append((columns, point, methods.weight_spec(ctx.cfg, columns, ctx.groups.get(point))))
    jobs.sort(key=lambda job: -job[0])  # stable: equal widths keep the block's order
    device = ctx.block.module(spec.readers(jobs[0][1])[0]).weight.device
    workers = min(2, torch.get_num_threads(), len(jobs)) if device.type == "cpu" else 1

    @torch.no_grad()  # grad mode is per thread
    def sweep(job):
        return _gptq_readers(ctx, job[1], job[2])

    if workers < 2:
        return {}
    with _single_thread_on_cpu(device), threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
        return {name: r for done in pool.map(sweep, jobs) for name, r in done.items()}


@torch.no_grad()
def quantize_weights(ctx: BlockContext, side_by_side: bool = True) -> dict[str, float]:
    """Quantize every linear of the block; returns each one's weight-only relative output error
    on the token rows its input point kept (in the transformed basis). ``side_by_side``: GPTQ
    sweeps of different inputs may run concurrently (:func:`_gptq_sweeps`)."""
    cfg, spec, block = ctx.cfg, ctx.spec, ctx.block
    bits = cfg.weight_bits
    errors = {}
    level_sets = hessian_diag = None
    swept = _gptq_sweeps(ctx) if cfg.w_quantizer == "gptq" and side_by_side and bits < FULL_PRECISION else {}
    if cfg.w_quantizer == "gptqt":
        from quant.gptqt import GPTQTConfig, enumerate_level_sets, gptqt_quantize

        gcfg = GPTQTConfig(bits=bits, inter_bits=cfg.gptqt.inter_bits or bits + 1, gammas=cfg.gptqt.gammas,
                           variant=cfg.gptqt.variant, blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        level_sets, hessian_diag = enumerate_level_sets(gcfg.n, gcfg.bits), {}
    for name, point in spec.linear_inputs.items():
        linear = block.module(name)
        W = linear.weight.data.float()
        wspec = methods.weight_spec(cfg, W.shape[1], ctx.groups.get(point))
        groups = wspec.group_sizes
        obs = ctx.observers[point]
        if cfg.w_quantizer == "gptqt":  # the Hessian is factorised by the first reader: keep its diagonal
            if point not in hessian_diag:
                hessian_diag[point] = obs.gptq.hessian.diagonal().clone()
            _, coded = gptqt_quantize(W, obs.gptq, gcfg, groups, hessian=hessian_diag[point], sets=level_sets)
            q, block.weight_codes[name] = _binary_weight(coded, W.device)
        elif cfg.w_quantizer == "bcq":
            from quant.bcq import bcq_quantize

            _, coded = bcq_quantize(W, bits, groups)
            q, block.weight_codes[name] = _binary_weight(coded, W.device)
        else:
            if cfg.w_quantizer == "gptq":
                if name not in swept:  # one input at a time
                    swept.update(_gptq_readers(ctx, point, wspec))
                q, scale, zero = swept.pop(name)
            else:
                scale, zero = weight_group_params(W, groups, bits, wspec)
                full_scale, full_zero = weight_params(W, groups, bits, wspec)
                q = fake_quant(W, full_scale, full_zero, bits, wspec.grid)
            block.weight_codes[name] = {"kind": "affine", "scale": scale.cpu(), "zero": zero.cpu(), "bits": bits,
                                        "grid": wspec.grid, "group_sizes": groups}
        if obs.samples:
            x = obs.sample().to(W.device)
            ref = x @ W.t()
            errors[name] = float((x @ (q - W).t()).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
        linear.weight.data = q.to(linear.weight.dtype)
        if obs.gptq is not None and spec.readers(point)[-1] == name:
            obs.gptq.free()  # its n x n factor is dead weight from here on
    return errors


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
        if not tap.spec.enabled or tap.spec.dynamic is not None or tap.spec.unit_grid:
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
