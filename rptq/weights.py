"""Quantize a block's weights: RTN, GPTQ (readers of one input in one sweep, two inputs' sweeps
side by side on CPU), GPTQT or BCQ; record each linear's codes for the packed checkpoint and its
weight-only error on the token rows its input point kept."""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from models.execution import run_block
from quant.bcq import bcq_quantize
from quant.gptqt import GPTQTConfig, gptqt_quantize
from quant.level_sets import enumerate_level_sets
from quant.packing import PackedBinary
from quant.quantizer import FULL_PRECISION, dequantize_weight, weight_codes, weight_group_params
from quant.threads import single_thread_on_cpu

from . import methods
from .context import BlockContext
from .methods.gptqt import GPTQTSettings
from .stats import ChannelObserver


def _binary_weight(coded, device) -> tuple[torch.Tensor, dict]:
    """The binary-coded weight as the packed format rebuilds it (alpha and offset in fp32, summed in a
    fixed order), so that a saved checkpoint reproduces the run bit for bit; and its codes."""
    alpha, offset = coded.alpha.float().cpu(), coded.offset.float().cpu()
    packed = PackedBinary.from_planes(coded.bits.cpu(), alpha, offset, coded.group_sizes)
    codes = {"kind": "binary", "planes": coded.bits.cpu(), "alpha": alpha, "offset": offset,
             "group_sizes": coded.group_sizes}
    return packed.dequantize(torch.float32).to(device), codes


def _with_clips(ctx: BlockContext, name: str, wspec):
    """The linear's spec with its learned per-row clipping factors (``--w_clip learned``), if any."""
    clips = ctx.weight_clips.get(name)
    return wspec if clips is None else dataclasses.replace(wspec, row_clip=clips)


def _gptq_readers(ctx: BlockContext, point: str, wspec, names: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """GPTQ of every linear reading ``point`` (or of ``names`` among them) in one sweep: name -> (q, codes, scale,
    zero).

    The readers share the input's inverse Hessian, and GPTQ treats each output row on its own
    given it, so their rows stacked (q/k/v: 3 x 768 rows of OPT-125m) take one column loop instead
    of one per linear: the loop's cost is thousands of small ops, nearly independent of the rows.
    Each row sees the same arithmetic as alone (tests/test_weights_sweep.py: bit for bit), so out of core, where
    the stacked copy costs memory, the caller sweeps one reader at a time."""
    names = names or ctx.spec.readers(point)
    weights = [ctx.block.module(n).weight.data.float() for n in names]
    specs = [_with_clips(ctx, n, wspec) for n in names]
    with single_thread_on_cpu(weights[0].device):  # extremes and rounding: exact on one thread, and far
        params = [weight_group_params(W, s.group_sizes, s.bits, s) for W, s in zip(weights, specs)]  # cheaper
    scale, zero = torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])
    q, codes = ctx.observers[point].gptq.quantize_codes(torch.cat(weights), scale, zero, wspec.bits,
                                                        group_sizes=wspec.group_sizes, blocksize=ctx.cfg.blocksize,
                                                        percdamp=ctx.cfg.percdamp, grid=wspec.grid,
                                                        act_order=ctx.cfg.act_order)
    rows = [W.shape[0] for W in weights]
    return {n: (qn.clone(), cn.clone(), *p)  # own storage each
            for n, qn, cn, p in zip(names, q.split(rows), codes.split(rows), params)}


def _gptq_sweeps(ctx: BlockContext) -> dict[str, tuple]:
    """Every input point's GPTQ sweep (:func:`_gptq_readers`): name -> (q, codes, scale, zero).

    A sweep runs on one thread (its column loop is thousands of small ops), so on a CPU with a
    spare core two sweeps run side by side, the largest input first (OPT-125m shape: fc2's 3072
    columns beside q/k/v, out_proj and fc1). Every operation inside a sweep is single-threaded
    either way -- the pool starts after torch and LAPACK are limited to one thread -- so the
    results are those of the sequential order, bit for bit (bench_calibration's digest). The results
    wait for the caller: one layer's quantized weights, and the sweeps' working copies side by side.
    Out of core, where memory binds, the caller sweeps one input at a time instead (returns {} here
    then, as with one worker)."""
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
    with single_thread_on_cpu(device), threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
        return {name: r for done in pool.map(sweep, jobs) for name, r in done.items()}


@torch.no_grad()
def remeasure_hessian(ctx: BlockContext, point: str) -> None:
    """GPTQ's sequential order: ``point``'s Hessian measured anew, by one more pass of the block over its
    calibration inputs through the weights quantized so far (activations FP, transforms in place; a quantizer the
    policy fixed before any statistic, as RPTQ's softmax grid, still acts)."""
    fresh = ChannelObserver(hessian=True)
    kept = ctx.block.taps
    ctx.block.taps = nn.ModuleDict({p: fresh if p == point else (nn.Identity() if isinstance(t, ChannelObserver) else t)
                                    for p, t in kept.items()})
    try:
        run_block(ctx.block, ctx.inputs, ctx.layer_kwargs)
    finally:
        ctx.block.taps = kept
    ctx.observers[point].gptq = fresh.gptq


@torch.no_grad()
def quantize_weights(ctx: BlockContext, side_by_side: bool = True, keep_codes: bool = True) -> dict[str, float]:
    """Quantize every linear of the block; returns each one's weight-only relative output error
    on the token rows its input point kept (in the transformed basis). ``side_by_side``: GPTQ
    sweeps of different inputs may run concurrently (:func:`_gptq_sweeps`); False (out of core, where
    memory binds): one input, and one reader of it, at a time. ``keep_codes``: keep each linear's integer
    codes in ``block.weight_codes`` for a packed checkpoint or an export (they cost a byte per weight)."""
    cfg, spec, block = ctx.cfg, ctx.spec, ctx.block
    bits = cfg.weight_bits
    errors = {}
    level_sets = hessian_diag = None
    sequential = cfg.w_quantizer == "gptq" and cfg.gptq_order == "sequential"
    swept = _gptq_sweeps(ctx) if cfg.w_quantizer == "gptq" and side_by_side and not sequential and \
        bits < FULL_PRECISION else {}
    reached = []  # the input points whose readers are being or have been quantized (sequential order)
    if cfg.w_quantizer == "gptqt":
        settings = cfg.of(GPTQTSettings)
        gcfg = GPTQTConfig(bits=bits, inter_bits=settings.inter_bits or bits + 1, gammas=settings.gammas,
                           variant=settings.variant, blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        level_sets, hessian_diag = enumerate_level_sets(gcfg.n, gcfg.bits), {}
    for name, point in spec.linear_inputs.items():
        linear = block.module(name)
        W = linear.weight.data.float()
        wspec = _with_clips(ctx, name, methods.weight_spec(cfg, W.shape[1], ctx.groups.get(point)))
        groups = wspec.group_sizes
        obs = ctx.observers[point]
        if cfg.w_quantizer == "gptqt":  # the Hessian is factorised by the first reader: keep its diagonal
            if point not in hessian_diag:
                hessian_diag[point] = obs.gptq.hessian.diagonal().clone()
            _, coded = gptqt_quantize(W, obs.gptq, gcfg, groups, hessian=hessian_diag[point], sets=level_sets)
            q, kept = _binary_weight(coded, W.device)
        elif cfg.w_quantizer == "bcq":
            _, coded = bcq_quantize(W, bits, groups)
            q, kept = _binary_weight(coded, W.device)
        else:
            if cfg.w_quantizer == "gptq":
                if sequential and point not in reached:
                    if reached:  # the first input's Hessian is the FP pass's own
                        remeasure_hessian(ctx, point)
                    reached.append(point)
                if name not in swept:  # one input at a time; out of core one reader at a time
                    swept.update(_gptq_readers(ctx, point, wspec, None if side_by_side else (name,)))
                q, codes, scale, zero = swept.pop(name)
            else:
                codes, scale, zero = weight_codes(W, groups, bits, wspec)
                q = dequantize_weight(codes, scale, zero, groups)
            # the quantizer's own integers: the packed checkpoint stores them as they are
            kept = {"kind": "affine", "codes": codes.cpu(), "scale": scale.cpu(), "zero": zero.cpu(), "bits": bits,
                    "grid": wspec.grid, "group_sizes": groups}
        if keep_codes:
            block.weight_codes[name] = kept
        del kept
        if obs.samples:
            x = obs.sample().to(W.device)
            ref = x @ W.t()
            errors[name] = float((x @ (q - W).t()).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
        linear.weight.data = q.to(linear.weight.dtype)
        if obs.gptq is not None and spec.readers(point)[-1] == name:
            obs.gptq.free()  # its n x n factor is dead weight from here on
    return errors
