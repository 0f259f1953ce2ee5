"""One full-precision pass over a block: per-channel ranges, GPTQ Hessians, token samples.

An observer sits at an activation point (it replaces the tap) and records, for each
calibration sample, the per-channel max and min over that sample's tokens; optionally the
Hessian of the point (for GPTQ) and a seeded sample of whole token rows (for clipping
searches and rotation searches). Transforms re-express all of it in their new basis
(``transform``), so nothing is measured twice. Metrics reduce the samples to ranges.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from quant.gptq import GPTQ
from quant.threads import single_thread_on_cpu
from quant.transforms import Permutation
from quant.quantizer import group_reduce

EMA_MOMENTUM = 0.99  # RPTQ reference: cached = 0.99 * cached + 0.01 * new, once per calibration sample
METRICS = ("ema_minmax", "minmax", "ema_channel", "mse", "layer_mse")


class ChannelObserver(nn.Module):
    def __init__(self, hessian: bool = False, sample_per_call: int = 0, seed: int = 0):
        super().__init__()
        self.maxes: list[torch.Tensor] = []
        self.mins: list[torch.Tensor] = []
        self.gptq: GPTQ | None = None
        self.want_hessian = hessian
        self.sample_per_call = sample_per_call
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)
        self.mixed = False  # a rotation mixed the channels: per-sample ranges now come from the token sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Samples on dim 0, channels on the last dim; every other dim is reduced.
        flat = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        # Extremes and row picks are exact whatever the thread count, and too small to share: on
        # this busy 2-core machine a two-thread amax of 512 x 768 took 0.3 to 7 ms, one thread 0.05-0.3.
        with single_thread_on_cpu(x.device):
            self.maxes.append(flat.amax(dim=1).float().cpu())
            self.mins.append(flat.amin(dim=1).float().cpu())
            if self.sample_per_call:
                rows = flat.reshape(-1, flat.shape[-1])
                pick = torch.randperm(rows.shape[0], generator=self._gen)[:self.sample_per_call]
                self.samples.append(rows[pick.to(rows.device)].float().cpu())
        if self.want_hessian:
            if self.gptq is None:
                self.gptq = GPTQ(x.shape[-1], device=x.device)
            self.gptq.add_batch(x)
        return x

    # -- what was seen ---------------------------------------------------------------------
    def per_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples, channels) maxima and minima."""
        return torch.cat(self.maxes), torch.cat(self.mins)

    def channel_minmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Running global (min, max) per channel over every calibration token."""
        maxes, mins = self.per_sample()
        with single_thread_on_cpu(maxes.device):  # exact on any thread count; too small to share
            return mins.amin(0), maxes.amax(0)

    def absmax(self) -> torch.Tensor:
        cmin, cmax = self.channel_minmax()
        return torch.maximum(cmin.abs(), cmax.abs())

    def sample(self) -> torch.Tensor:
        if not self.samples:
            raise ValueError("this point kept no token sample")
        return torch.cat(self.samples)

    def group_ranges(self, metric: str, group_sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) per contiguous channel group (``(C,)`` = per tensor) under ``metric``.

        minmax: the global extremes. ema_minmax (RPTQ reference): an EMA over calibration samples
        of each sample's *group* extreme, started at sample 0 (the reference overwrites its cached
        per-channel range with the group extreme in place). ema_channel: an EMA per channel, then the
        group extreme (this toolkit's earlier semantics; never wider, since an EMA of maxima is at
        least the maximum of the EMAs).
        """
        maxes, mins = self.per_sample()
        # Extremes and elementwise EMAs: exact on any thread count, and small (samples x channels):
        # one thread took 2 ms where two took 30-45 ms on this busy machine (3072 channels, 31 groups).
        with single_thread_on_cpu(maxes.device):
            if metric in ("minmax", "mse", "layer_mse"):  # the searches start from the full range
                return group_reduce(mins.amin(0), group_sizes, "min"), group_reduce(maxes.amax(0), group_sizes, "max")
            if metric == "ema_minmax":
                return _ema(group_reduce(mins, group_sizes, "min")), _ema(group_reduce(maxes, group_sizes, "max"))
            if metric == "ema_channel":
                return group_reduce(_ema(mins), group_sizes, "min"), group_reduce(_ema(maxes), group_sizes, "max")
        raise ValueError(f"unknown metric {metric!r}")

    # -- re-expression in a new basis ---------------------------------------------------------
    def transform(self, t) -> None:
        """The point's channels were re-expressed by transform ``t`` (quant.transforms)."""
        if self.samples:
            self.samples = [t.apply(s) for s in self.samples]
        ranges = None if self.mixed else t.ranges(torch.cat(self.mins), torch.cat(self.maxes))
        if ranges is not None:
            mins, maxes = ranges
            self.mins, self.maxes = list(mins.split(1)), list(maxes.split(1))
        else:  # channels mixed: per-channel extremes are no longer a function of the old ones
            self.mixed = True
            if self.samples:
                sample = self.sample()
                self.mins, self.maxes = [sample.amin(0, keepdim=True)], [sample.amax(0, keepdim=True)]
            else:
                self.mins = self.maxes = []
        if self.gptq is not None and self.gptq.hessian is not None:
            t.hessian(self.gptq.hessian)

    def permute(self, perm: torch.Tensor) -> None:
        self.transform(Permutation(perm))


def _ema(per_sample: torch.Tensor) -> torch.Tensor:
    """RPTQ reference's EMA over calibration samples (dim 0), initialised with sample 0."""
    value = per_sample[0].clone()
    for i in range(1, per_sample.shape[0]):
        value = EMA_MOMENTUM * value + (1 - EMA_MOMENTUM) * per_sample[i]
    return value


def sample_per_call(total: int, calls: int) -> int:
    """Token rows to keep per calibration sample so that about ``total`` are kept overall."""
    return 0 if total <= 0 else max(1, math.ceil(total / max(calls, 1)))
