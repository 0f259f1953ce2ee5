"""RMSNorm as a module of our own: what a LayerNorm becomes once the residual it reads is zero-mean.

Statistics in float32 as transformers' RMSNorm and torch's LayerNorm compute them, whatever the
input dtype, so an fp16 model keeps its LayerNorm's numerics after the replacement.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)
