"""One decoder block: observe, transform, quantize, produce the next inputs.

Two passes over the calibration set per block: one in full precision that gathers every
statistic (ranges, GPTQ Hessians, token samples; rptq/observe.py) and the block's FP
outputs, and one through the quantized block that yields the next block's inputs and,
against the FP outputs, the block's quantization error (rptq/block_error.py). Between them
the method's transform steps run on the statistics (re-expressed, never re-measured), then
weights (rptq/weights.py) and activation quantizers (rptq/act_quantizers.py) are built.
A third pass comes first only where a quantizer the policy fixes (RPTQ's softmax grid) acts in the
statistics pass and the first step wants its channel features without it (RPTQ's k-means, as the
reference clusters on the unquantized layer).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from models.block import QuantBlock
from models.execution import run_block
from models.spec import PROBS
from quant.quantizer import FULL_PRECISION

from . import methods
from .act_quantizers import activation_quantizers, layer_mse_search
from .block_error import MeasuredTap, block_errors
from .block_report import BlockReport
from .config import QuantConfig
from .context import BlockContext
from .observe import make_observers
from .stats import ChannelObserver
from .plot_ranges import plot_ranges, range_snapshot
from .weights import quantize_weights


def calibrate_block(block: QuantBlock, inputs: torch.Tensor, layer_kwargs: dict, cfg: QuantConfig,
                    layer: int = 0, keep_ranges: bool = False,
                    side_by_side: bool = True,
                    given: dict | None = None, keep_codes: bool = True) -> tuple[torch.Tensor, BlockReport]:
    """Transform and quantize ``block`` in place; return the next block's inputs: its quantized outputs on
    ``inputs``, or with ``cfg.block_inputs == "fp"`` its full-precision ones (FlatQuant trains every block on
    the FP model's activations), or with "weights" the quantized ones only where the weights were quantized.
    ``side_by_side``: see :func:`quantize_weights` (False out of core, where memory binds). ``given``: what the model steps handed this layer (e.g. SpinQuant's learned R2).
    ``keep_codes``: keep the weights' integer codes (for --save_quantized or --export)."""
    spec = block.spec
    report = BlockReport()
    timing = report.timing
    t0 = time.perf_counter()
    # A quantizer the policy fixes before any statistic (RPTQ's softmax grid) already acts in the statistics
    # pass, as in the reference, so the ranges and Hessians downstream of it see what the quantized block will
    # produce; a first step that wants its features without it gets them from one more pass before.
    fixed = methods.policy(cfg).fixed_quantizers(cfg, spec)
    features = None
    wants = methods.step(cfg.transforms[0]).unquantized_features if cfg.transforms else None
    if fixed and wants is not None and wants(cfg):
        features = {p: ChannelObserver() for p, role in spec.points.items() if role != PROBS}
        block.taps = nn.ModuleDict({p: features.get(p, nn.Identity()) for p in spec.points})
        run_block(block, inputs, layer_kwargs)
        timing.passes += 1
    observers = make_observers(spec, cfg, inputs.shape[0], layer)
    block.taps = nn.ModuleDict({p: observers.get(p, fixed.get(p, nn.Identity())) for p in spec.points})
    fp_out = run_block(block, inputs, layer_kwargs)
    timing.passes += 1
    t1 = time.perf_counter()

    ctx = BlockContext(block, observers, cfg, layer, given=dict(given or {}), inputs=inputs, fp_outputs=fp_out,
                       layer_kwargs=layer_kwargs, feature_observers=features)
    before = range_snapshot(observers) if keep_ranges else {}
    for name in cfg.transforms:
        step = methods.step(name).block
        if step is not None:
            step(ctx)
    fit = methods.clip_fits().get(cfg.w_clip_fit)  # --w_clip learned: per-row clipping trained on the block output
    if fit is not None and cfg.weight_bits < FULL_PRECISION and \
            not any(methods.step(s).fits_weight_clips for s in cfg.transforms):
        fit(ctx)
    t2 = time.perf_counter()

    weight_errors = quantize_weights(ctx, side_by_side, keep_codes) if cfg.weight_bits < FULL_PRECISION else {}
    t3 = time.perf_counter()

    taps = activation_quantizers(ctx)
    if keep_ranges:
        report.ranges = plot_ranges(before, ctx, taps)
    del observers, ctx.observers
    if cfg.metric == "layer_mse":
        report.decisions["layer_mse_clip"] = layer_mse_search(block, taps, inputs, fp_out, layer_kwargs)
    measured = {p: MeasuredTap(t) for p, t in taps.items()}
    block.taps = nn.ModuleDict(measured).to(inputs.device)
    outputs = run_block(block, inputs, layer_kwargs)
    block.taps = nn.ModuleDict({p: m.quantizer for p, m in measured.items()})
    timing.passes += 1
    t4 = time.perf_counter()

    report.errors = block_errors(outputs, fp_out, weight_errors, measured)
    report.layouts = dict(ctx.groups)
    report.decisions.update(ctx.decisions)
    report.placements = ctx.placements
    timing.stats_s, timing.transform_s, timing.weights_s, timing.output_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    quantized = cfg.block_inputs == "quantized" or (cfg.block_inputs == "weights" and cfg.weight_bits < FULL_PRECISION)
    return (outputs if quantized else fp_out), report
