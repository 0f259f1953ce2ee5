"""GPTQT (Guo et al., 2024, arXiv 2407.02891): quantize twice, end in pure binary coding.

Step 1 quantizes each row linearly to n bits (scale re-explored, §5 of the GPTQT paper).
Step 2 converts the row's n-bit integers to a k-bit binary code whose 2^k levels are picked, by
exhaustive search, among level sets that lie on the n-bit grid (§3). The two steps merge into
offset + sum_i alpha_i b_i (quant.bcq.BinaryCoded), so the integers never reach the kernel (§4).

The paper's method section was not available; every reconstructed choice is a GPTQTConfig field
whose default is the spec's. ``variant`` says where GPTQ's error feedback sits (§6):
  A: GPTQ at n bits, then convert its final codes (conversion error left uncompensated);
  B: choose the level set from RTN codes, then GPTQ rounds every column onto it (compensated).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bcq import BinaryCoded, resolve_groups
from .gptq import GPTQ
from .grid import affine_params, dequantize, quantize
from .level_sets import (LevelSets, choose_candidates, enumerate_level_sets, histograms, index_histograms,
                         patterns_of, reconstruct, table_index, uniform_level_sets, value_tables)
from .quantizer import expand_groups, group_reduce

GAMMAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))  # 0.50, 0.55, ..., 1.50
_CHUNK_ELEMS = 1 << 22  # per-row work runs on slabs of rows of about this many weights (or costs)


@dataclass(frozen=True)
class GPTQTConfig:
    bits: int = 3  # k: bit planes of the final binary code
    inter_bits: int | None = None  # n of step 1; None: k + 1 (ASSUMPTION, §2)
    gammas: tuple[float, ...] = GAMMAS  # re-explore range factors (ASSUMPTION, §5); (1.0,) disables
    variant: str = "B"  # "A" or "B" (§6)
    hessian_weighted: bool = True  # histogram and score weights h_j = H_jj (else 1)
    score: str = "diag"  # re-explore objective (ASSUMPTION, §5): "diag" sum_j H_jj e_j^2, or "full" e H e^T
    convert: bool = True  # False: stop after step 1 (n-bit uniform, exactly GPTQ/RTN at n bits)
    blocksize: int = 128
    percdamp: float = 0.01

    @property
    def n(self) -> int:
        return self.inter_bits if self.inter_bits is not None else self.bits + 1


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int) -> torch.Tensor:
    """Step-1 integers: the n-bit full grid's codes (quant.grid), as int64 table indices."""
    return quantize(w, scale, zero, n, "full").long()


def _per_column(values: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
    """(rows, G) -> broadcastable against (rows, cols); one group needs no copy."""
    return values if len(group_sizes) == 1 else expand_groups(values, group_sizes)


def merge(patterns, cand, scale, zero, sets: LevelSets, group_sizes) -> BinaryCoded:
    """§4: alpha_i = Delta u_i / 2, offset = Delta (l0 + sum(u)/2 - z); the signs pick the level."""
    u = sets.u[cand].double()  # (rows, G, k)
    step = scale.double()
    alpha = step[..., None] * u / 2
    offset = step * (sets.l0[cand].double() + u.sum(-1) / 2 - zero.double())
    return BinaryCoded.from_patterns(patterns, alpha, offset, group_sizes)


def _row_slabs(rows: int, group_sizes, sets: LevelSets):
    """Row slices small enough for rows x cols temporaries and the rows x groups x candidates costs."""
    step = max(1, _CHUNK_ELEMS // max(sum(group_sizes), len(group_sizes) * sets.cost.shape[0]))
    return [slice(r, r + step) for r in range(0, rows, step)]


@dataclass(frozen=True)
class Step1:
    scale: torch.Tensor  # (rows, G) fp32
    zero: torch.Tensor  # (rows, G)
    cand: torch.Tensor  # (rows, G) level set chosen on the RTN codes at this scale
    objective: torch.Tensor  # (rows, G) fp64: the score of the chosen gamma


def _scores(err: torch.Tensor, h: torch.Tensor, hessian: torch.Tensor | None, group_sizes) -> torch.Tensor:
    """(rows, G) fp64: sum_j h_j e_j^2 per group, or e_g H_gg e_g^T (the exact e H e^T when G = 1)."""
    if hessian is None:
        e2h = err.double().square_().mul_(h)
        if len(set(group_sizes)) == 1:  # equal groups: one reshape instead of a loop
            return e2h.view(err.shape[0], len(group_sizes), group_sizes[0]).sum(-1)
        return torch.stack([p.sum(-1) for p in e2h.split(list(group_sizes), dim=-1)], dim=-1)
    parts, start = [], 0
    for e, size in zip(err.split(list(group_sizes), dim=-1), group_sizes):
        parts.append(((e @ hessian[start:start + size, start:start + size]) * e).double().sum(-1))
        start += size
    return torch.stack(parts, dim=-1)


def reexplore(weight: torch.Tensor, h: torch.Tensor, sets: LevelSets, gammas: tuple[float, ...],
              group_sizes: tuple[int, ...], hessian: torch.Tensor | None = None) -> Step1:
    """§5: for each gamma, range [gamma*xmin, gamma*xmax] -> n-bit RTN codes -> conversion; keep per
    (row, group) the gamma with the lowest score (first gamma on ties): h-weighted squared error, or
    with the full ``hessian`` the output error of each group. gamma = 1 is the min-max range of
    quantizer.weight_group_params (0 always inside). ``h`` also weights the conversion histograms."""
    rows, cols = weight.shape
    w = weight.detach().float()
    gmin = group_reduce(w, group_sizes, "min").clamp(max=0)
    gmax = group_reduce(w, group_sizes, "max").clamp(min=0)
    parts = []
    for rs in _row_slabs(rows, group_sizes, sets):
        x, lo, hi = w[rs], gmin[rs], gmax[rs]
        best = None
        for gamma in gammas:
            scale, zero = affine_params(gamma * lo, gamma * hi, sets.n)
            codes = codes_of(x, _per_column(scale, group_sizes), _per_column(zero, group_sizes), sets.n)
            index = table_index(codes, group_sizes, sets.n)
            cand = choose_candidates(index_histograms(index, h, len(group_sizes), sets.n), sets)
            w_hat = value_tables(cand, scale, zero, sets).flatten(1).gather(1, index)
            obj = _scores(x - w_hat, h, hessian, group_sizes)
            if best is None:
                best = [scale, zero, cand, obj]
            else:
                better = obj < best[3]
                best = [torch.where(better, new, old) for new, old in zip((scale, zero, cand, obj), best)]
        parts.append(best)
    return Step1(*(torch.cat(p, dim=0) for p in zip(*parts)))


class _CodeRecorder:
    """GPTQ column hook: GPTQ's own n-bit rounding, then the nearest level of the row's set;
    records each column's n-bit code (which the set maps to a sign pattern afterwards)."""

    def __init__(self, step1: Step1, cand: torch.Tensor, sets: LevelSets, shape, device):
        self.scale, self.zero = step1.scale.to(device), step1.zero.to(device)
        self.cand, self.sets = cand.to(device), sets.to(device)
        self.codes = torch.empty(shape, dtype=torch.uint8, device=device)

    def __call__(self, w: torch.Tensor, column: int, group: int) -> torch.Tensor:
        scale, zero = self.scale[:, group], self.zero[:, group]
        code = codes_of(w, scale, zero, self.sets.n)
        self.codes[:, column] = code.to(self.codes.dtype)
        level = self.sets.level_of_code[self.cand[:, group], code]
        return dequantize(level.to(w.dtype), scale, zero)


def gptqt_quantize(weight: torch.Tensor, gptq: GPTQ | None, cfg: GPTQTConfig,
                   group_sizes: tuple[int, ...] | None = None, hessian: torch.Tensor | None = None,
                   sets: LevelSets | None = None) -> tuple[torch.Tensor, BinaryCoded]:
    """Quantize one (rows, cols) weight; returns (fake-quantized weight, its binary code), with
    coded.dequantize() bit-identical to the weight.

    ``gptq`` None: no error feedback (RTN-style). ``hessian``: the layer-input Hessian, (cols, cols), or
    just its diagonal (cols,) when cfg.score is "diag"; None reads ``gptq.hessian``, which GPTQ frees
    when it factorises, so pass it for a second weight on the same input (q/k/v).
    ``sets``: enumerate_level_sets(cfg.n, cfg.bits), built here when not given.
    """
    rows, cols = weight.shape
    sizes = resolve_groups(group_sizes, cols)
    if not cfg.convert:
        sets = uniform_level_sets(cfg.n)
    elif sets is None:
        sets = enumerate_level_sets(cfg.n, cfg.bits)
    if not 1 <= cfg.bits <= cfg.n <= 8:
        raise ValueError(f"need 1 <= bits <= inter_bits <= 8, got bits={cfg.bits}, inter_bits={cfg.n}")
    if (sets.n, sets.k) != ((cfg.n, cfg.bits) if cfg.convert else (cfg.n, cfg.n)):
        raise ValueError(f"level sets are for (n={sets.n}, k={sets.k}), the config asks for n={cfg.n}, k={cfg.bits}")
    if hessian is None and gptq is not None and (cfg.hessian_weighted or cfg.score == "full"):
        if gptq.hessian is None:
            raise ValueError("the GPTQ Hessian is already factorised: pass hessian (or its diagonal), read before")
        hessian = gptq.hessian
    if cfg.score not in ("diag", "full") or (cfg.score == "full" and (hessian is None or hessian.dim() != 2)):
        raise ValueError(f"score {cfg.score!r} needs 'diag', or 'full' with a (cols, cols) Hessian")
    device = gptq.device if gptq is not None else weight.device
    sets = sets.to(device)
    h = torch.ones(cols, dtype=torch.float64, device=device)
    if cfg.hessian_weighted and hessian is not None:
        h = (hessian.diagonal() if hessian.dim() == 2 else hessian).to(device, torch.float64)
    w = weight.detach().to(device, torch.float32)
    full = hessian.to(device, torch.float32) if cfg.score == "full" else None
    step1 = reexplore(w, h, sets, cfg.gammas, sizes, full)
    cand, w_hat, codes = step1.cand.clone(), None, None
    if gptq is not None:
        if cfg.variant not in ("A", "B"):
            raise ValueError(f"variant must be 'A' or 'B', got {cfg.variant!r}")
        grid = sets if cfg.variant == "B" else uniform_level_sets(sets.n)
        hook = _CodeRecorder(step1, cand if cfg.variant == "B" else torch.zeros_like(cand), grid, (rows, cols),
                             device)
        w_hat = gptq.quantize(weight, step1.scale, step1.zero, sets.n, group_sizes, cfg.blocksize, cfg.percdamp,
                              column_quantizer=hook).float()
        codes = hook.codes
    patterns = torch.empty(rows, cols, dtype=torch.uint8, device=device)
    rebuild = gptq is None or cfg.variant == "A"
    if rebuild:
        w_hat = torch.empty(rows, cols, dtype=torch.float32, device=device)
    for rs in _row_slabs(rows, sizes, sets):  # per-row conversion, a slab of rows at a time
        scale, zero = step1.scale[rs], step1.zero[rs]
        if codes is None:  # no GPTQ: the RTN codes at the re-explored scale
            c = codes_of(w[rs], _per_column(scale, sizes), _per_column(zero, sizes), sets.n)
        else:
            c = codes[rs].long()
        if gptq is not None and cfg.variant == "A":  # convert GPTQ's final n-bit codes (§6 A)
            cand[rs] = choose_candidates(histograms(c, h, sizes, sets.n), sets)
        if rebuild:
            w_hat[rs] = reconstruct(c, cand[rs], scale, zero, sets, sizes)
        patterns[rs] = patterns_of(c, cand[rs], sets, sizes)
    return w_hat.to(weight.dtype), merge(patterns, cand, step1.scale, step1.zero, sets, sizes)
