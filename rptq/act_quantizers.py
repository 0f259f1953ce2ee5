"""A block's activation quantizers, from the method's policy and the observed ranges, and the
``--metric layer_mse`` search over their clipping."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.block import QuantBlock
from models.execution import run_block
from quant.quantizer import ActQuantizer, expand_groups
from quant.search import mse_clip_ranges

from . import methods
from .context import BlockContext

LAYER_MSE_WINDOWS = 4  # calibration windows the layer_mse search scores on
LAYER_MSE_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def block_device(block: QuantBlock) -> torch.device:
    """Where the block's weights live (its layer's device under --multigpu placement)."""
    return next(block.layer.parameters()).device


def activation_quantizers(ctx: BlockContext) -> dict[str, ActQuantizer]:
    """Per point, its quantizer on the block's device. The observers keep their ranges and samples
    on the CPU, so a quantizer built from them starts there: moved here, before anything runs it
    (layer_mse's search runs the block with them)."""
    policy = methods.policy(ctx.cfg)
    device = block_device(ctx.block)
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
        taps[point] = ActQuantizer(qspec, cmin, cmax).to(device)
        taps[point].ranges = (cmin, cmax)  # what layer_mse's search clips
    return taps


@torch.no_grad()
def layer_mse_search(block: QuantBlock, taps: dict, inputs: torch.Tensor, fp_out: torch.Tensor,
                     layer_kwargs: dict) -> dict[str, float]:
    """--metric layer_mse: per static point, in forward order, the clipping ratio of its ranges
    that minimises the block's output MSE on the first few calibration windows (greedy)."""
    k = min(LAYER_MSE_WINDOWS, inputs.shape[0])
    chosen = {}
    device = block_device(block)

    def loss() -> float:
        return float((run_block(block, inputs[:k], layer_kwargs) - fp_out[:k]).float().pow(2).mean())

    block.taps = nn.ModuleDict(taps)
    for point, tap in taps.items():
        if not tap.spec.static:
            continue
        cmin, cmax = tap.ranges
        best = (loss(), 1.0, tap)
        for ratio in LAYER_MSE_RATIOS[1:]:
            # The ranges are the observers' (CPU): the candidate's scale and zero must follow the block.
            candidate = ActQuantizer(dataclasses.replace(tap.spec, clip=ratio), cmin, cmax).to(device)
            block.taps[point] = candidate
            value = loss()
            if value < best[0]:
                best = (value, ratio, candidate)
        block.taps[point] = taps[point] = best[2]
        chosen[point] = best[1]
    return chosen
