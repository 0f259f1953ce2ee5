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


def _per_column(values: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
    """(rows, G) -> broadcastable against (rows, cols); one group needs no copy."""
    return values if len(group_sizes) == 1 else expand_groups(values, group_sizes)


def _table_index(codes: torch.Tensor, group_sizes: tuple[int, ...], n: int) -> torch.Tensor:
    """codes + 2^n * group: each weight's entry in its row's flattened (groups, 2^n) tables."""
    if len(group_sizes) == 1:
        return codes
    group_of = torch.repeat_interleave(torch.arange(len(group_sizes), device=codes.device),
                                       torch.tensor(group_sizes, device=codes.device))
    return codes + group_of * 2**n


def _histograms(index: torch.Tensor, h: torch.Tensor, groups: int, n: int) -> torch.Tensor:
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
    return _histograms(_table_index(codes, group_sizes, n), h, len(group_sizes), n)


def choose_candidates(hist: torch.Tensor, sets: LevelSets) -> torch.Tensor:
    """Step 2 (§3): per histogram, the candidate minimising sum_v hist_v (v - nearest(v))^2."""
    return (hist @ sets.cost.t()).argmin(dim=-1)


def value_tables(cand, scale, zero, sets: LevelSets) -> torch.Tensor:
    """(rows, G, 2^n) fp32: the dequantized value of every code, (level - z) * Delta."""
    return (sets.level_of_code[cand].to(scale.dtype) - zero[..., None]) * scale[..., None]


def reconstruct(codes, cand, scale, zero, sets: LevelSets, group_sizes) -> torch.Tensor:
    """(level - z) * Delta in fp32: bit-identical to the merged offset + sum alpha_i b_i (the fp64
    sum is exact, both round the same real number once), and to fake_quant when level == code."""
    return value_tables(cand, scale, zero, sets).flatten(1).gather(1, _table_index(codes, group_sizes, sets.n))


def patterns_of(codes, cand, sets: LevelSets, group_sizes) -> torch.Tensor:
    """(rows, cols) uint8: the sign pattern of each code's level (bit i set <=> b_i = +1)."""
    table = sets.nearest[cand].to(torch.uint8).flatten(1)
    return table.gather(1, _table_index(codes, group_sizes, sets.n))


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
            index = _table_index(codes, group_sizes, sets.n)
            cand = choose_candidates(_histograms(index, h, len(group_sizes), sets.n), sets)
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
        return (level.to(w.dtype) - zero) * scale


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
