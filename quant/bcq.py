"""Binary-coding quantization (BCQ) with an offset: w ~ offset + sum_i alpha_i b_i, b_i in {-1, +1}.

This is the layout LUT-GEMM-style kernels consume: k sign planes per weight, k scales and one
offset per output row and contiguous input group. GPTQT produces it (quant.gptqt); ``bcq_quantize``
here is the plain binary-coding baseline (greedy residual init, then alternating least-squares refits
of the scales and re-assignment of the signs, Xu et al. 2018 as used by LUT-GEMM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import expand_groups

_CHUNK_ELEMS = 1 << 22  # rows are dequantized in slabs of about this many weights (fp64 temporaries)


def sign_patterns(k: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(2^k, k) signs: row s holds b_i = +1 where bit i of s is set, else -1 (pattern s <-> bits)."""
    s = torch.arange(2**k, device=device)
    return (((s[:, None] >> torch.arange(k, device=device)) & 1) * 2 - 1).to(dtype)


def resolve_groups(group_sizes: tuple[int, ...] | None, cols: int) -> tuple[int, ...]:
    return tuple(group_sizes) if group_sizes is not None else (cols,)


@dataclass(frozen=True)
class BinaryCoded:
    """k sign planes + per-(row, group) scales and offset.

    ``alpha``/``offset`` are kept in fp64: GPTQT's alpha_i = Delta*u_i/2 needs a few bits more than
    fp32 holds, and in fp64 the sum offset + sum alpha_i b_i is exact, so ``dequantize`` rounds once
    and reproduces Delta*(level - z) bit for bit. Casting to a kernel's fp16 is the exporter's job.
    """

    bits: torch.Tensor  # (k, rows, cols) bool, True is b = +1
    alpha: torch.Tensor  # (rows, groups, k) fp64
    offset: torch.Tensor  # (rows, groups) fp64
    group_sizes: tuple[int, ...]

    @property
    def k(self) -> int:
        return self.bits.shape[0]

    @staticmethod
    def from_patterns(patterns: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor,
                      group_sizes: tuple[int, ...]) -> "BinaryCoded":
        """Split integer sign patterns (rows, cols) (bit i set <=> b_i = +1) into bit planes."""
        bits = torch.stack([((patterns >> i) & 1).bool() for i in range(alpha.shape[-1])])
        return BinaryCoded(bits, alpha, offset, tuple(group_sizes))

    def levels(self) -> torch.Tensor:
        """(rows, groups, 2^k) fp64: the value of every sign pattern (index s as in sign_patterns)."""
        signs = sign_patterns(self.k, device=self.alpha.device)
        return self.offset[..., None] + self.alpha @ signs.t()

    def dequantize(self) -> torch.Tensor:
        """offset + sum_i alpha_i b_i in fp64 (i in order), rounded once to fp32."""
        k, rows, cols = self.bits.shape
        out = torch.empty(rows, cols, dtype=torch.float32, device=self.bits.device)
        step = max(1, _CHUNK_ELEMS // max(cols, 1))
        for r in range(0, rows, step):
            sl = slice(r, r + step)
            acc = expand_groups(self.offset[sl], self.group_sizes)
            for i in range(k):
                acc = acc + expand_groups(self.alpha[sl, :, i], self.group_sizes) * (self.bits[i, sl].double() * 2 - 1)
            out[sl] = acc.float()
        return out


def _greedy(x: torch.Tensor, k: int):
    """Offset = mean; each plane takes the sign of the residual, its scale the mean |residual|
    (the optimal scale for those signs)."""
    offset = x.mean(dim=1)
    r = x - offset[:, None]
    alpha = x.new_empty(x.shape[0], k)
    patterns = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    for i in range(k):
        pos = r >= 0
        alpha[:, i] = r.abs().mean(dim=1)
        r = r - alpha[:, i, None] * (pos.to(x.dtype) * 2 - 1)
        patterns |= pos.long() << i
    return offset, alpha, patterns


def _refit(x: torch.Tensor, patterns: torch.Tensor, k: int):
    """Least-squares (offset, alpha) for fixed signs, batched over rows; pinv handles constant planes."""
    planes = [torch.ones_like(x)] + [((patterns >> i) & 1).to(x.dtype) * 2 - 1 for i in range(k)]
    normal = x.new_empty(x.shape[0], k + 1, k + 1)
    for i in range(k + 1):
        for j in range(i, k + 1):
            normal[:, i, j] = normal[:, j, i] = (planes[i] * planes[j]).sum(dim=1)
    rhs = torch.stack([(p * x).sum(dim=1) for p in planes], dim=1)
    sol = (torch.linalg.pinv(normal) @ rhs[..., None])[..., 0]
    return sol[:, 0], sol[:, 1:]


def _assign(x: torch.Tensor, offset: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Nearest of the 2^k levels for every weight (sorted levels + midpoints: no rows x cols x 2^k)."""
    levels = offset[:, None] + alpha @ sign_patterns(alpha.shape[1], x.dtype, x.device).t()
    ordered, order = levels.sort(dim=1)
    mids = (ordered[:, 1:] + ordered[:, :-1]) / 2
    return order.gather(1, torch.searchsorted(mids.contiguous(), x.contiguous()))


def bcq_quantize(weight: torch.Tensor, bits: int, group_sizes: tuple[int, ...] | None = None,
                 iters: int = 15) -> tuple[torch.Tensor, BinaryCoded]:
    """Plain k-bit BCQ with offset per output row (group_sizes None) or contiguous input group.

    Greedy init, then ``iters`` rounds of (least-squares refit, re-assignment); each round can only
    lower the weight MSE. Returns (fake-quantized weight == coded.dequantize(), coded).
    """
    sizes = resolve_groups(group_sizes, weight.shape[1])
    offsets, alphas, patterns = [], [], []
    for x in weight.detach().double().split(list(sizes), dim=1):
        offset, alpha, pattern = _greedy(x, bits)
        for _ in range(iters):
            offset, alpha = _refit(x, pattern, bits)
            pattern = _assign(x, offset, alpha)
        offsets.append(offset)
        alphas.append(alpha)
        patterns.append(pattern)
    coded = BinaryCoded.from_patterns(torch.cat(patterns, dim=1).to(torch.uint8), torch.stack(alphas, dim=1),
                                      torch.stack(offsets, dim=1), sizes)
    return coded.dequantize(), coded
