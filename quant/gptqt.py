"""GPTQT (Guo et al., 2024, arXiv 2407.02891): quantize twice, end in pure binary coding.

Step 1 quantizes each row linearly to n bits (scale re-explored, §5 of shared/methods/gptqt.md).
Step 2 converts the row's n-bit integers to a k-bit binary code whose 2^k levels are picked, by
exhaustive search, among level sets that lie on the n-bit grid (§3). The two steps merge into
offset + sum_i alpha_i b_i (quant.bcq.BinaryCoded), so the integers never reach the kernel (§4).

The paper's method section was not available; every reconstructed choice is a GPTQTConfig field
whose default is the spec's. ``variant`` says where GPTQ's error feedback sits (§6):
  A: GPTQ at n bits, then convert its final codes (conversion error left uncompensated);
  B: choose the level set from RTN codes, then GPTQ rounds every column onto it (compensated).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .bcq import BinaryCoded, resolve_groups, sign_patterns
from .gptq import GPTQ
from .quantizer import affine_params, expand_groups, group_reduce

GAMMAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))  # 0.50, 0.55, ..., 1.50
_CHUNK_ELEMS = 1 << 22  # re-explore works on slabs of rows of about this many weights


@dataclass(frozen=True)
class GPTQTConfig:
    bits: int = 3  # k: bit planes of the final binary code
    inter_bits: int | None = None  # n of step 1; None: k + 1 (ASSUMPTION, §2)
    gammas: tuple[float, ...] = GAMMAS  # re-explore range factors (ASSUMPTION, §5); (1.0,) disables
    variant: str = "B"  # "A" or "B" (§6)
    hessian_weighted: bool = True  # histogram and score weights h_j = H_jj (else 1)
    convert: bool = True  # False: stop after step 1 (n-bit uniform, exactly GPTQ/RTN at n bits)
    blocksize: int = 128
    percdamp: float = 0.01

    @property
    def n(self) -> int:
        return self.inter_bits if self.inter_bits is not None else self.bits + 1


@dataclass(frozen=True)
class LevelSets:
    """Every allowed k-bit level set on the n-bit grid, with per-code lookup tables.

    Candidate c has levels l0 + (sum of a subset of u); sign pattern s (bit i set <=> b_i = +1)
    selects the subset {i : b_i = +1}. Candidates are ordered by preference so that argmin's
    first-index rule breaks cost ties: larger span (spec), then more distinct levels, then levels
    spread more evenly (lower cost on a flat histogram), then larger bases, then lower l0.
    """

    n: int
    k: int
    u: torch.Tensor  # (C, k) int64, u_1 >= ... >= u_k >= 1
    l0: torch.Tensor  # (C,) int64
    levels: torch.Tensor  # (C, 2^k) int64, level of each sign pattern
    nearest: torch.Tensor  # (C, 2^n) int64: pattern of the level nearest each code (ties: lower level)
    level_of_code: torch.Tensor  # (C, 2^n) int64: that level
    cost: torch.Tensor  # (C, 2^n) fp64: (code - level)^2

    def to(self, device) -> "LevelSets":
        return LevelSets(self.n, self.k, *(t.to(device) for t in (self.u, self.l0, self.levels, self.nearest,
                                                                  self.level_of_code, self.cost)))


def build_level_sets(n: int, k: int, candidates: list[tuple[int, tuple[int, ...]]]) -> LevelSets:
    """Tables for the given (l0, u) candidates, in the given order."""
    u = torch.tensor([c[1] for c in candidates], dtype=torch.long).reshape(len(candidates), k)
    l0 = torch.tensor([c[0] for c in candidates], dtype=torch.long)
    plus = sign_patterns(k, torch.long) > 0  # (2^k, k)
    levels = l0[:, None] + (plus[None] * u[:, None, :]).sum(-1)  # (C, 2^k)
    codes = torch.arange(2**n)
    dist = (codes[None, :, None] - levels[:, None, :]).abs()  # (C, 2^n, 2^k)
    # lexicographic (distance, level, pattern) in one integer key: ties go to the lower level
    key = (dist * 2 ** (n + 1) + levels[:, None, :]) * 2**k + torch.arange(2**k)
    nearest = key.argmin(dim=-1)
    level_of_code = levels.gather(1, nearest)
    cost = ((codes[None] - level_of_code) ** 2).double()
    return LevelSets(n, k, u, l0, levels, nearest, level_of_code, cost)


def enumerate_level_sets(n: int, k: int) -> LevelSets:
    """All integer bases u_1 >= ... >= u_k >= 1 and l0 >= 0 with l0 + sum(u) <= 2^n - 1 (§3).
    Build once per (n, k) and pass around (441 sets for n=4, k=3; 7225 for n=5, k=3)."""
    top = 2**n - 1
    found = []
    for asc in itertools.combinations_with_replacement(range(1, top + 1), k):
        if sum(asc) <= top:
            u = tuple(reversed(asc))
            found += [(l0, u) for l0 in range(top - sum(u) + 1)]
    sets = build_level_sets(n, k, found)
    distinct = [len(set(row)) for row in sets.levels.tolist()]
    flat = sets.cost.sum(dim=1).tolist()
    order = sorted(range(len(found)), key=lambda c: (-sum(found[c][1]), -distinct[c], flat[c],
                                                     tuple(-x for x in found[c][1]), found[c][0]))
    return build_level_sets(n, k, [found[c] for c in order])


def uniform_level_sets(n: int) -> LevelSets:
    """The n-bit grid itself as the only candidate: u = (2^(n-1), ..., 1), l0 = 0 (lossless)."""
    return build_level_sets(n, n, [(0, tuple(2**i for i in reversed(range(n))))])


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int) -> torch.Tensor:
    """Step-1 integers, rounded exactly as quantizer.fake_quant rounds."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**n - 1).long()


def histograms(codes: torch.Tensor, h: torch.Tensor, group_sizes: tuple[int, ...], n: int) -> torch.Tensor:
    """(rows, groups, 2^n) fp64: per row and group, the h-weighted count of each code."""
    rows, cols = codes.shape
    group_of = torch.repeat_interleave(torch.arange(len(group_sizes), device=codes.device),
                                       torch.tensor(group_sizes, device=codes.device))
    index = codes + group_of * 2**n
    hist = torch.zeros(rows, len(group_sizes) * 2**n, dtype=torch.float64, device=codes.device)
    hist.scatter_add_(1, index, h.double().expand(rows, cols))
    return hist.view(rows, len(group_sizes), 2**n)


def choose_candidates(hist: torch.Tensor, sets: LevelSets) -> torch.Tensor:
    """Step 2 (§3): per histogram, the candidate minimising sum_v hist_v (v - nearest(v))^2."""
    return (hist @ sets.cost.t()).argmin(dim=-1)


def reconstruct(codes, cand, scale, zero, sets: LevelSets, group_sizes) -> torch.Tensor:
    """(level - z) * Delta in fp32: bit-identical to the merged offset + sum alpha_i b_i (the fp64
    sum is exact, both round the same real number once), and to fake_quant when level == code."""
    lvl = sets.level_of_code[expand_groups(cand, group_sizes), codes]
    return (lvl.to(scale.dtype) - expand_groups(zero, group_sizes)) * expand_groups(scale, group_sizes)


def merge(codes, cand, scale, zero, sets: LevelSets, group_sizes) -> BinaryCoded:
    """§4: alpha_i = Delta u_i / 2, offset = Delta (l0 + sum(u)/2 - z); the signs pick the level."""
    u = sets.u[cand].double()  # (rows, G, k)
    step = scale.double()
    alpha = step[..., None] * u / 2
    offset = step * (sets.l0[cand].double() + u.sum(-1) / 2 - zero.double())
    patterns = sets.nearest[expand_groups(cand, group_sizes), codes]
    return BinaryCoded.from_patterns(patterns, alpha, offset, group_sizes)


@dataclass(frozen=True)
class Step1:
    scale: torch.Tensor  # (rows, G) fp32
    zero: torch.Tensor  # (rows, G)
    cand: torch.Tensor  # (rows, G) level set chosen on the RTN codes at this scale
    objective: torch.Tensor  # (rows, G) fp64: sum_j h_j (w_j - w_hat_j)^2 after conversion


def reexplore(weight: torch.Tensor, h: torch.Tensor, sets: LevelSets, gammas: tuple[float, ...],
              group_sizes: tuple[int, ...]) -> Step1:
    """§5: for each gamma, range [gamma*xmin, gamma*xmax] -> n-bit RTN codes -> conversion; keep per
    (row, group) the gamma with the lowest h-weighted error (first gamma on ties). gamma = 1 is the
    min-max range of quantizer.weight_group_params (0 always inside)."""
    rows, cols = weight.shape
    w = weight.detach().float()
    gmin = group_reduce(w, group_sizes, "min").clamp(max=0)
    gmax = group_reduce(w, group_sizes, "max").clamp(min=0)
    step = max(1, _CHUNK_ELEMS // max(cols, len(group_sizes) * sets.cost.shape[0]))
    parts = []
    for r in range(0, rows, step):
        x, lo, hi = w[r:r + step], gmin[r:r + step], gmax[r:r + step]
        best = None
        for gamma in gammas:
            scale, zero = affine_params(gamma * lo, gamma * hi, sets.n)
            codes = codes_of(x, expand_groups(scale, group_sizes), expand_groups(zero, group_sizes), sets.n)
            cand = choose_candidates(histograms(codes, h, group_sizes, sets.n), sets)
            err = (x - reconstruct(codes, cand, scale, zero, sets, group_sizes)).double() ** 2 * h.double()
            obj = torch.stack([e.sum(-1) for e in err.split(list(group_sizes), dim=-1)], dim=-1)
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
        self.codes = torch.empty(shape, dtype=torch.uint8 if sets.n <= 8 else torch.long, device=device)

    def __call__(self, w: torch.Tensor, column: int, group: int) -> torch.Tensor:
        scale, zero = self.scale[:, group], self.zero[:, group]
        code = codes_of(w, scale, zero, self.sets.n)
        self.codes[:, column] = code.to(self.codes.dtype)
        level = self.sets.level_of_code[self.cand[:, group], code]
        return (level.to(w.dtype) - zero) * scale


def gptqt_quantize(weight: torch.Tensor, gptq: GPTQ | None, cfg: GPTQTConfig,
                   group_sizes: tuple[int, ...] | None = None, hdiag: torch.Tensor | None = None,
                   sets: LevelSets | None = None) -> tuple[torch.Tensor, BinaryCoded]:
    """Quantize one (rows, cols) weight; returns (fake-quantized weight, its binary code), with
    coded.dequantize() bit-identical to the weight.

    ``gptq`` None: no error feedback (RTN-style). ``hdiag``: H_jj; read from ``gptq`` while its
    Hessian is still unfactorised, so pass it explicitly for a second weight on the same input.
    ``sets``: enumerate_level_sets(cfg.n, cfg.bits), built here when not given.
    """
    rows, cols = weight.shape
    sizes = resolve_groups(group_sizes, cols)
    if not cfg.convert:
        sets = uniform_level_sets(cfg.n)
    elif sets is None:
        sets = enumerate_level_sets(cfg.n, cfg.bits)
    if (sets.n, sets.k) != ((cfg.n, cfg.bits) if cfg.convert else (cfg.n, cfg.n)):
        raise ValueError(f"level sets are for (n={sets.n}, k={sets.k}), the config asks for n={cfg.n}, k={cfg.bits}")
    h = torch.ones(cols, dtype=torch.float64)
    if cfg.hessian_weighted and (gptq is not None or hdiag is not None):
        if hdiag is None and gptq.hessian is None:
            raise ValueError("the GPTQ Hessian is already factorised: pass hdiag (its diagonal, read before)")
        h = (hdiag if hdiag is not None else gptq.hessian.diagonal()).double().cpu()
    w = weight.detach().float().cpu()
    step1 = reexplore(w, h, sets, cfg.gammas, sizes)
    cand = step1.cand
    if gptq is None:
        codes = codes_of(w, expand_groups(step1.scale, sizes), expand_groups(step1.zero, sizes), sets.n)
        w_hat = reconstruct(codes, cand, step1.scale, step1.zero, sets, sizes)
    else:
        if cfg.variant not in ("A", "B"):
            raise ValueError(f"variant must be 'A' or 'B', got {cfg.variant!r}")
        grid = sets if cfg.variant == "B" else uniform_level_sets(sets.n)
        hook = _CodeRecorder(step1, cand if cfg.variant == "B" else torch.zeros_like(cand), grid, (rows, cols),
                             gptq.device)
        w_hat = gptq.quantize(weight, step1.scale, step1.zero, sets.n, group_sizes, cfg.blocksize, cfg.percdamp,
                              column_quantizer=hook).cpu().float()
        codes = hook.codes.long().cpu()
        if cfg.variant == "A":  # convert GPTQ's final n-bit codes (§6 A)
            cand = choose_candidates(histograms(codes, h, sizes, sets.n), sets)
            w_hat = reconstruct(codes, cand, step1.scale, step1.zero, sets, sizes)
    return w_hat.to(weight.dtype), merge(codes, cand, step1.scale, step1.zero, sets, sizes)
