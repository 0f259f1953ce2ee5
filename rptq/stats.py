"""One full-precision pass over a block: per-channel ranges and GPTQ Hessians.

An observer sits at an activation point (it replaces the tap) and records, for
each calibration sample, the per-channel max and min over that sample's tokens.
The metric then reduces the samples to one range per channel.
"""
from __future__ import annotations

import torch
from torch import nn

from quant.gptq import GPTQ

EMA_MOMENTUM = 0.99  # RPTQ reference: cached = 0.99 * cached + 0.01 * new, per calibration batch


class ChannelObserver(nn.Module):
    def __init__(self, hessian: bool = False):
        super().__init__()
        self.maxes: list[torch.Tensor] = []
        self.mins: list[torch.Tensor] = []
        self.gptq: GPTQ | None = None
        self.want_hessian = hessian

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Samples on dim 0, channels on the last dim; every other dim is reduced.
        flat = x.detach().reshape(x.shape[0], -1, x.shape[-1]).float()
        self.maxes.append(flat.amax(dim=1).cpu())
        self.mins.append(flat.amin(dim=1).cpu())
        if self.want_hessian:
            if self.gptq is None:
                self.gptq = GPTQ(x.shape[-1], device=x.device)
            self.gptq.add_batch(x)
        return x

    def per_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples, channels) maxima and minima."""
        return torch.cat(self.maxes), torch.cat(self.mins)

    def ranges(self, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) under ``metric``: 'minmax' or 'ema_minmax'."""
        maxes, mins = self.per_sample()
        if metric == "minmax":
            return mins.amin(0), maxes.amax(0)
        if metric == "ema_minmax":
            cmax, cmin = maxes[0].clone(), mins[0].clone()
            for i in range(1, maxes.shape[0]):
                cmax = EMA_MOMENTUM * cmax + (1 - EMA_MOMENTUM) * maxes[i]
                cmin = EMA_MOMENTUM * cmin + (1 - EMA_MOMENTUM) * mins[i]
            return cmin, cmax
        raise ValueError(f"unknown metric {metric!r}")

    def permute(self, perm: torch.Tensor) -> None:
        """Re-express the statistics in a permuted channel order."""
        self.maxes = [m[..., perm] for m in self.maxes]
        self.mins = [m[..., perm] for m in self.mins]
        if self.gptq is not None:
            self.gptq.permute(perm)
