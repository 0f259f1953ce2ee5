"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse
Hessian of the layer's inputs.

Scales are fixed before the sweep (passed in), so any grouping of input channels
(RPTQ's clusters) works without GPTQ knowing where it came from.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .quantizer import fake_quant


@contextmanager
def _single_thread_on_cpu(device: torch.device):
    """GPTQ on CPU is thousands of tiny ops plus a few mid-sized factorisations: thread
    hand-offs cost more than they save, and under load they collapse (measured on this
    2-core machine, busy: a 1024x1024 weight 0.17 s with one thread vs 3.9 s with two;
    the 4096-column Cholesky steps 1.7 s vs 25 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class GPTQ:
    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.columns = columns
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate H = 2/N * sum x x^T over every token row of ``inputs`` (..., columns)."""
        x = inputs.reshape(-1, self.columns).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        self.hessian *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        self.hessian.addmm_(x.t(), x)

    def permute(self, perm: torch.Tensor) -> None:
        """Reorder the input channels (the Hessian of x[perm] is H[perm][:, perm])."""
        perm = perm.to(self.hessian.device)
        self.hessian = self.hessian[perm][:, perm]

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
        """Return the fake-quantized weight; ``scale``/``zero`` have the weight's shape."""
        with _single_thread_on_cpu(self.hessian.device):
            return self._quantize(weight, scale, zero, bits, blocksize, percdamp)

    def _quantize(self, weight, scale, zero, bits, blocksize, percdamp) -> torch.Tensor:
        W = weight.detach().to(self.hessian.device, torch.float32).clone()
        scale = scale.to(W.device)
        zero = zero.to(W.device)
        H = self.hessian.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        damp = percdamp * torch.mean(torch.diag(H))
        H += damp * torch.eye(self.columns, device=H.device)
        # Upper Cholesky factor of H^-1: row i holds the update weights for column i's error.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        Q = torch.zeros_like(W)
        for start in range(0, self.columns, blocksize):
            end = min(start + blocksize, self.columns)
            W1 = W[:, start:end].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[start:end, start:end]
            for i in range(end - start):
                col = start + i
                w = W1[:, i]
                q = fake_quant(w, scale[:, col], zero[:, col], bits)
                Q[:, col] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
                Err1[:, i] = err
            W[:, end:] -= Err1 @ Hinv[start:end, end:]
        return Q.to(weight.dtype)

    def free(self) -> None:
        self.hessian = None
