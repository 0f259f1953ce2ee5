"""GPTQT's step 2 vocabulary (Guo et al., 2024, §3): the k-bit level sets
that lie on the n-bit grid, and per-code lookups into them -- which level (and sign pattern) each
n-bit code rounds to, what that costs, and the value it dequantizes to (quant.grid's formula).
quant.gptqt picks a set per row and group and runs the quantization around them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .bcq import sign_patterns
from .grid import dequantize


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


def table_index(codes: torch.Tensor, group_sizes: tuple[int, ...], n: int) -> torch.Tensor:
    """codes + 2^n * group: each weight's entry in its row's flattened (groups, 2^n) tables."""
    if len(group_sizes) == 1:
        return codes
    group_of = torch.repeat_interleave(torch.arange(len(group_sizes), device=codes.device),
                                       torch.tensor(group_sizes, device=codes.device))
    return codes + group_of * 2**n


def index_histograms(index: torch.Tensor, h: torch.Tensor, groups: int, n: int) -> torch.Tensor:
    rows, cols = index.shape
    unit = (h.double().max() * cols / 2**52).clamp(min=torch.finfo(torch.float64).tiny)
    hist = torch.zeros(rows, groups * 2**n, dtype=torch.long, device=index.device)
    hist.scatter_add_(1, index, torch.round(h.double() / unit).long().expand(rows, cols))
    return hist.view(rows, groups, 2**n).double() * unit


def histograms(codes: torch.Tensor, h: torch.Tensor, group_sizes: tuple[int, ...], n: int) -> torch.Tensor:
    """(rows, groups, 2^n) fp64: per row and group, the h-weighted count of each code.

    Accumulated in int64 fixed point (h scaled so that a whole row sums to at most 2^52): integer adds
    commute, so the counts and the argmins after them are the same on every device and run (an fp64
    scatter_add on CUDA is not), at a resolution of cols * 2^-52 of max h."""
    return index_histograms(table_index(codes, group_sizes, n), h, len(group_sizes), n)


def choose_candidates(hist: torch.Tensor, sets: LevelSets) -> torch.Tensor:
    """Step 2 (§3): per histogram, the candidate minimising sum_v hist_v (v - nearest(v))^2."""
    return (hist @ sets.cost.t()).argmin(dim=-1)


def value_tables(cand, scale, zero, sets: LevelSets) -> torch.Tensor:
    """(rows, G, 2^n) fp32: the dequantized value of every code, (level - z) * Delta."""
    return dequantize(sets.level_of_code[cand].to(scale.dtype), scale[..., None], zero[..., None])


def reconstruct(codes, cand, scale, zero, sets: LevelSets, group_sizes) -> torch.Tensor:
    """(level - z) * Delta in fp32: bit-identical to the merged offset + sum alpha_i b_i (the fp64
    sum is exact, both round the same real number once), and to fake_quant when level == code."""
    return value_tables(cand, scale, zero, sets).flatten(1).gather(1, table_index(codes, group_sizes, sets.n))


def patterns_of(codes, cand, sets: LevelSets, group_sizes) -> torch.Tensor:
    """(rows, cols) uint8: the sign pattern of each code's level (bit i set <=> b_i = +1)."""
    table = sets.nearest[cand].to(torch.uint8).flatten(1)
    return table.gather(1, table_index(codes, group_sizes, sets.n))
