"""Training one block against its full-precision outputs: what learned methods (FlatQuant) and learned weight
clipping (``--w_clip learned``) share.

During training the block runs through its own forward with, at each activation point, a training tap (the
point's learnable transform, then a fake quantizer whose rounding passes the gradient straight through, its
clipping learned or fixed) and every linear's weight computed from learnable parameters (consumer transforms,
learned clipping, straight-through rounding) under ``torch.func.functional_call``: the block's own tensors are
only read. The loss is the MSE against the block's full-precision outputs on the same calibration inputs,
divided by its own detached value (FlatQuant's normalisation), minimised by AdamW on a cosine schedule.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from quant.grid import affine_params, code_range
from quant.quantizer import ActQuantizer, QuantSpec, WeightSpec, expand_groups, group_reduce

from . import methods
from .config import QuantConfig
from .context import BlockContext

CLIP_INIT = 4.0  # sigmoid(4) = 0.982: the clipping factors start just inside the full range (LWC, LAC)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """quant.grid's fake_quant, differentiable: straight through the rounding, zero outside the clamp, and into
    the scale (so a clipping factor that sets the scale learns)."""
    qmin, qmax = code_range(bits, grid)
    return (torch.clamp(round_ste(x / scale) + zero, qmin, qmax) - zero) * scale


class SteTap(nn.Module):
    """A fixed activation quantizer (static ranges or dynamic) whose rounding passes the gradient straight
    through; its scales carry no gradient."""

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            shift = self.quantizer(x.detach()) - x.detach()
        return x + shift


class ClipFactor(nn.Module):
    """A clipping factor in (0, 1) as sigmoid(logit), one per ``shape`` entry (LWC: per row; LAC: per point)."""

    def __init__(self, shape, init: float = CLIP_INIT):
        super().__init__()
        self.logit = nn.Parameter(torch.full(shape, init))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


class LearnedClipQuant(nn.Module):
    """Per-token dynamic fake quantization of a QuantSpec with learned clipping (FlatQuant's LAC): each token's
    (group's) maximum times one learned factor and its minimum times another (the range reaching 0 first where the
    spec says so), on the spec's grid, straight through."""

    def __init__(self, spec: QuantSpec, learn: bool = True):
        super().__init__()
        if spec.dynamic != "token":
            raise ValueError("a learned activation clip needs a per-token dynamic quantizer")
        self.spec = spec
        self.clip = RowClips(1) if learn else None

    def factors(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(factor on the maximum, factor on the minimum)."""
        if self.clip is not None:
            return self.clip()
        return self.spec.clip, self.spec.clip if self.spec.clip_low is None else self.spec.clip_low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        xf = x.float()
        sizes = spec.group_sizes or (x.shape[-1],)
        up, low = self.factors()
        gmin, gmax = group_reduce(xf, sizes, "min"), group_reduce(xf, sizes, "max")
        if spec.zero_in_range:
            gmin, gmax = gmin.clamp(max=0), gmax.clamp(min=0)
        scale, zero = affine_params(gmin * low, gmax * up, spec.bits, spec.grid)
        return fake_quant_ste(xf, expand_groups(scale, sizes), expand_groups(zero, sizes), spec.bits,
                              spec.grid).to(x.dtype)


class RowClips(nn.Module):
    """A factor on a range's maximum and one on its minimum, per row: LWC, per output row of a linear; LAC, one
    pair per activation point (rows=1)."""

    def __init__(self, rows: int):
        super().__init__()
        self.up, self.low = ClipFactor((rows,)), ClipFactor((rows,))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up(), self.low()


def ste_weight(weight: torch.Tensor, spec: WeightSpec, up: torch.Tensor | None = None,
               low: torch.Tensor | None = None) -> torch.Tensor:
    """The weight fake-quantized as quant.quantizer.weight_group_params ranges it (groups, 0 included or not,
    the fixed ratio), with per-row factors ``up``/``low`` on the max and min (LWC), differentiable in both."""
    sizes = spec.group_sizes if spec.group_sizes is not None else (weight.shape[-1],)
    wmin, wmax = group_reduce(weight, sizes, "min"), group_reduce(weight, sizes, "max")
    if spec.include_zero:
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    wmin, wmax = wmin * spec.clip, wmax * spec.clip
    if up is not None:
        wmin, wmax = wmin * low.reshape(-1, 1), wmax * up.reshape(-1, 1)
    scale, zero = affine_params(wmin, wmax, spec.bits, spec.grid)
    return fake_quant_ste(weight, expand_groups(scale, sizes), expand_groups(zero, sizes), spec.bits, spec.grid)


def training_weight_spec(cfg: QuantConfig, columns: int, groups: tuple[int, ...] | None) -> WeightSpec:
    """The run's weight grid and groups, round to nearest, for learning: no clipping search, exact scales."""
    spec = methods.weight_spec(cfg, columns, groups)
    return WeightSpec(bits=spec.bits, group_sizes=spec.group_sizes, grid=spec.grid, include_zero=spec.include_zero,
                      clip=spec.clip)


@dataclass(frozen=True)
class Schedule:
    """FlatQuant's optimisation: epochs over the calibration windows in batches, AdamW (torch's defaults
    besides the learning rates), cosine annealing to ``lr * min_ratio``."""

    epochs: int
    batch: int
    min_ratio: float = 1e-3


def block_mse(ctx: BlockContext, weights: Callable[[], dict], batch: int) -> float:
    """Mean block-output MSE against the FP outputs over the calibration batches, with the taps installed."""
    n = ctx.inputs.shape[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n - batch + 1, batch):
            out = functional_call(ctx.block, weights(), (ctx.inputs[start:start + batch],), ctx.layer_kwargs)
            total += float((out.float() - ctx.fp_outputs[start:start + batch].float()).pow(2).mean())
            count += 1
    return total / max(count, 1)


def train_block(ctx: BlockContext, taps: dict[str, nn.Module], weights: Callable[[], dict],
                param_groups: list[dict], schedule: Schedule) -> dict:
    """Minimise the block-output MSE over the learnable parameters in ``param_groups`` (AdamW groups, each with
    its "lr"); ``taps``: point -> training tap (other points pass through); ``weights()``: the linears'
    weights as functions of the parameters (functional_call names, e.g. "layer.mlp.up_proj.weight").
    Returns what results.json records of it (MSE before and after, per epoch, seconds)."""
    start = time.perf_counter()
    block, n = ctx.block, ctx.inputs.shape[0]
    batch = max(1, min(schedule.batch, n))
    steps = n // batch  # FlatQuant drops the last partial batch
    saved = block.taps
    block.taps = nn.ModuleDict({p: taps.get(p, nn.Identity()) for p in ctx.spec.points})
    try:
        before = block_mse(ctx, weights, batch)
        epochs = []
        if schedule.epochs and any(p.requires_grad for g in param_groups for p in g["params"]):
            optimizer = torch.optim.AdamW(param_groups)
            lr = max(g["lr"] for g in param_groups)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.epochs * steps,
                                                                eta_min=lr * schedule.min_ratio)
            with torch.enable_grad():
                for _ in range(schedule.epochs):
                    total = 0.0
                    for j in range(steps):
                        x = ctx.inputs[j * batch:(j + 1) * batch]
                        out = functional_call(block, weights(), (x,), ctx.layer_kwargs)
                        loss = (out.float() - ctx.fp_outputs[j * batch:(j + 1) * batch].float()).pow(2).mean()
                        optimizer.zero_grad()
                        if float(loss.detach()) > 0:  # 0: nothing is quantized and the transforms are exact
                            (loss / loss.detach()).backward()
                            optimizer.step()
                        cosine.step()
                        total += float(loss.detach())
                    epochs.append(total / steps)
        after = block_mse(ctx, weights, batch) if epochs else before
    finally:
        block.taps = saved
    return {"mse_before": before, "mse_after": after, "epoch_mse": epochs, "steps": len(epochs) * steps,
            "batch": batch, "seconds": time.perf_counter() - start,
            "finite": all(math.isfinite(v) for v in (before, after, *epochs))}
