"""A quantized block's error against the full-precision block: per activation point and in its output."""
from __future__ import annotations

import math

import torch
from torch import nn

from quant.threads import single_thread_on_cpu


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
        with single_thread_on_cpu(x.device):
            y = self.quantizer(x)
            xf = x.float()
            sq = y.float() - xf
            sq.mul_(sq)
        self.err += float(sq.sum())
        with single_thread_on_cpu(x.device):
            torch.mul(xf, xf, out=sq)
        self.energy += float(sq.sum())
        return y


def _sqnr_db(rel_mse: float) -> float:
    return math.inf if rel_mse <= 0 else -10 * math.log10(rel_mse)


def block_errors(outputs: torch.Tensor, fp_out: torch.Tensor, weight_errors: dict,
                 measured: dict[str, MeasuredTap]) -> dict:
    """The block's output error (relative MSE, SQNR), each linear's weight-only error and each
    quantized point's activation error, as results.json's ``layer_errors`` lists them."""
    rel = float((outputs.float() - fp_out.float()).pow(2).sum() / fp_out.float().pow(2).sum().clamp(min=1e-30))
    return {"block_rel_mse": rel, "block_sqnr_db": _sqnr_db(rel), "weights": weight_errors,
            "points": {p: m.err / max(m.energy, 1e-30) for p, m in measured.items()
                       if m.quantizer.spec.enabled}}
