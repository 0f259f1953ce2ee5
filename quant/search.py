"""Clipping searches for static ranges (RPTQ's --metric mse), model-free."""
from __future__ import annotations

import torch

from .grid import affine_params, fake_quant
from .quantizer import expand_groups

MSE_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.0 .. 0.3


def group_sum(per_channel: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([p.sum(-1) for p in per_channel.split(list(group_sizes), dim=-1)], dim=-1)


@torch.no_grad()
def mse_clip_ranges(sample: torch.Tensor, gmin: torch.Tensor, gmax: torch.Tensor, group_sizes: tuple[int, ...],
                    bits: int, grid: str = "full", ratios=MSE_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the range [r * min, r * max] (r from ``ratios``) whose fake quantization of the
    token rows ``sample`` (N, C) has the least squared error; ties keep the widest range."""
    sample = sample.float()
    best_err = best_min = best_max = None
    for r in ratios:
        lo, hi = gmin * r, gmax * r
        scale, zero = affine_params(lo, hi, bits, grid)
        q = fake_quant(sample, expand_groups(scale, group_sizes), expand_groups(zero, group_sizes), bits, grid)
        err = group_sum((q - sample).pow(2).sum(0), group_sizes)
        if best_err is None:
            best_err, best_min, best_max = err, lo.clone(), hi.clone()
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min, best_max = torch.where(better, lo, best_min), torch.where(better, hi, best_max)
    return best_min, best_max
