"""QuaRot's weight clipping search (its ``--w_clip``, the GPTQ repository's ``mse`` range): per output
row and input group, shrink the range [min, max] by p = 1 - i / 100 for i = 0 .. 79 and keep the p
whose round-to-nearest weight has the least sum |w_hat - w|^2.4. The chosen range then feeds the
grid as any range does (RTN, or GPTQ's fixed scales before its column sweep)."""
from __future__ import annotations

import torch

from .grid import affine_params, fake_quant

GRID_STEPS = 100  # p moves in steps of 1 / GRID_STEPS ...
MAX_SHRINK = 0.8  # ... down to 1 - MAX_SHRINK (exclusive), as in QuaRot's WeightQuantizer
NORM = 2.4


@torch.no_grad()
def clip_search(weight: torch.Tensor, sizes: tuple[int, ...], wmin: torch.Tensor, wmax: torch.Tensor, bits: int,
                grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The searched (wmin, wmax), (rows, groups) like the inputs; ``sizes`` are the column groups."""
    w = weight.float()
    counts = torch.tensor(sizes, device=w.device)
    best = torch.full_like(wmax, torch.inf)
    best_p = torch.ones_like(wmax)
    for i in range(int(MAX_SHRINK * GRID_STEPS)):
        p = 1 - i / GRID_STEPS
        scale, zero = affine_params(wmin * p, wmax * p, bits, grid)
        w_hat = fake_quant(w, scale.repeat_interleave(counts, dim=-1), zero.repeat_interleave(counts, dim=-1), bits,
                           grid)
        err = w_hat.sub_(w).abs_().pow_(NORM)
        err = torch.stack([part.sum(-1) for part in err.split(list(sizes), dim=-1)], dim=-1)
        better = err < best  # strict: ties keep the wider range, as QuaRot's loop does
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return wmin * best_p, wmax * best_p
