"""DuQuant's transform primitives: block-diagonal greedy rotations and the zigzag permutation.

Nothing here knows about models or methods. For activations X (..., C) with C = K*n, DuQuant
(Lin et al., 2024) builds T = blockdiag(R1) . P . blockdiag(R2): R1/R2 are n x n orthogonal
matrices repeated on the K diagonal blocks, each found by a greedy search that repeatedly mixes
the channel holding the largest outlier evenly over its block; P is a "zigzag" channel
permutation that deals the channels with the largest maxima round-robin over the blocks so
that R2 can spread what R1 left behind.

T is orthogonal, so for a linear layer y = x W^T + b

    y = (x T)(W T)^T + b,    x T = apply_duquant(x, t),  W T = apply_duquant(W, t)

i.e. the weight gets the *same* transform on its input columns (rows of W treated like tokens)
and that is its inverse; the bias is untouched. `invert_duquant` applies T^T.

Rotations are built and returned in float64: the released code accumulates up to 256 step
matrices in fp16, which leaves R about 4e-3 away from orthogonal. Cast only when applying.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .threads import single_thread_on_cpu

OUTLIER_INDEX = ("official", "paper")
_CPU_CHUNK_ROWS = 4096  # rows of Z per matmul on CPU: the product's min/max are taken while it is in cache


def sylvester_hadamard(n: int) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix (H H^T = I), n a power of two; float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (float64): QR of a Gaussian with R's diagonal made
    positive, which removes QR's sign convention from the distribution."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def duquant_base(n: int) -> torch.Tensor:
    """DuQuant's base rotation (float64) whose row 0 is (1/sqrt(n)) * 1.

    Product G_{n-2} ... G_1 G_0 of Givens rotations in planes (i, i+1) with cos = 1/sqrt(i+2):
    row n-1 of that product telescopes to the uniform vector, and swapping indices 0 and n-1
    (rows and columns) moves it to row 0, so e_0 . R spreads a lone outlier at channel 0
    evenly over the block."""
    if n < 2:
        raise ValueError(f"block size must be at least 2, got {n}")
    r = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):  # left-multiply by G_i: only rows i and i+1 change
        c, s = 1.0 / math.sqrt(i + 2), math.sqrt((i + 1) / (i + 2))
        ri, rj = r[i].clone(), r[i + 1].clone()
        r[i], r[i + 1] = c * ri - s * rj, s * ri + c * rj
    return _swap(r, 0, n - 1)


def randomised_base(n: int, generator: torch.Generator) -> torch.Tensor:
    """B = R~ . diag(1, Q'), Q' the Q factor of an (n-1) x (n-1) Gaussian (no sign fix, as in
    the released code).

    Only B[0,0] = 1/sqrt(n) survives from R~'s uniform row 0: the rest of row 0 becomes
    (1/sqrt(n)) 1^T Q', a random direction, so one step spreads a lone outlier v to entries
    of size ~v*2.5/sqrt(n) rather than exactly v/sqrt(n). That is what the released code does."""
    return _randomise(duquant_base(n), generator)


def _randomise(base: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = base.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=generator, dtype=torch.float64))
    out = base.clone()
    out[:, 1:] = base[:, 1:] @ q  # = base @ diag(1, q)
    return out


def _swap(m: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """E m E with E the transposition of indices i and j (a copy)."""
    m = m.clone()
    if i != j:
        m[[i, j]] = m[[j, i]]
        m[:, [i, j]] = m[:, [j, i]]
    return m


def step_rotation(base: torch.Tensor, d: int) -> torch.Tensor:
    """R_d = E_d B E_d: moves channel d to 0, spreads it with B's row 0, swaps back, so that
    |(e_d R_d)_d| = 1/sqrt(n)."""
    return _swap(base, 0, d)


@dataclass(frozen=True)
class RotationResult:
    matrix: torch.Tensor  # (n, n) float64, product of the kept step rotations
    steps_kept: int  # k*: 0 means identity
    scores: list[float]  # range of Z after k steps, k = 0..steps


def _rotate_and_extremes(z: torch.Tensor, rot: torch.Tensor, out: torch.Tensor):
    """out = z @ rot; returns (min, max) per row chunk as two 1-D tensors and the chunk size.

    On CPU Z is far larger than the cache and the step is memory-bound: reducing each chunk
    right after its product saves two full passes over Z per step."""
    rows = _CPU_CHUNK_ROWS if z.device.type == "cpu" else z.shape[0]
    mins, maxs = [], []
    for a, b in zip(z.split(rows), out.split(rows)):
        torch.matmul(a, rot, out=b)
        lo, hi = torch.aminmax(b)
        mins.append(lo)
        maxs.append(hi)
    return torch.stack(mins), torch.stack(maxs), rows


def _extremes(z: torch.Tensor):
    rows = _CPU_CHUNK_ROWS if z.device.type == "cpu" else z.shape[0]
    pairs = [torch.aminmax(a) for a in z.split(rows)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), rows


def _outlier_position(z: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, rows: int):
    """(row, col) of the first largest-|value| element (the min unless |max| is strictly
    larger, the released code's tie rule)."""
    use_max = bool(maxs.max().abs() > mins.min().abs())
    chunk = int(maxs.argmax() if use_max else mins.argmin())  # first chunk holding the extreme
    part = z[chunk * rows:(chunk + 1) * rows]
    flat = int(part.argmax() if use_max else part.argmin())
    r, c = divmod(flat, z.shape[1])
    return chunk * rows + r, c


def greedy_rotation(x: torch.Tensor, block: int, steps: int = 256, outlier_index: str = "official",
                    generator: torch.Generator | None = None,
                    fresh_base_each_step: bool = False) -> RotationResult:
    """DuQuant's greedy search for ONE n x n rotation shared by every block of every token.

    Z = x as (rows, n): each step takes the largest-|value| element at (r, c), rotates with
    R_d (d = r mod n, "official": the released code's row-index slip; d = c, "paper": the outlier's
    channel) and scores range(Z) = max - min. The best prefix k* = argmin score is kept (the first
    on ties, so k* = 0 -> identity and the objective never gets worse than the input's).

    Z is updated in float32 (float64 if x is) - it only steers the choices; the rotation is
    accumulated in float64 so it stays orthogonal to ~1e-14. One randomised base per call as in
    the released code, or a fresh Q' per step as in the paper's Algorithm 1."""
    if outlier_index not in OUTLIER_INDEX:
        raise ValueError(f"outlier_index must be one of {OUTLIER_INDEX}, got {outlier_index!r}")
    if x.shape[-1] % block:
        raise ValueError(f"{x.shape[-1]} channels are not a multiple of the block size {block}")
    if generator is None:
        raise ValueError("pass a seeded torch.Generator (no global RNG state)")
    # Hundreds of small sequential steps: one thread (see single_thread_on_cpu; 64x512 input,
    # 256 steps, busy 2-core machine: 0.36 s with one thread vs 7.8 s with two).
    with single_thread_on_cpu(x.device):
        return _greedy(x, block, steps, outlier_index, generator, fresh_base_each_step)


def _greedy(x, block, steps, outlier_index, generator, fresh_base_each_step) -> RotationResult:
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.detach().reshape(-1, block).to(work, copy=True)
    spare = torch.empty_like(z)
    fixed = duquant_base(block)
    base = _randomise(fixed, generator)
    total = torch.eye(block, dtype=torch.float64)
    best, best_k = total, 0
    mins, maxs, rows = _extremes(z)
    scores = []
    for k in range(steps + 1):
        scores.append(float(maxs.max() - mins.min()))
        if scores[k] < scores[best_k]:
            best, best_k = total, k
        if k == steps:
            break
        r, c = _outlier_position(z, mins, maxs, rows)
        if fresh_base_each_step and k > 0:
            base = _randomise(fixed, generator)
        rot = step_rotation(base, r % block if outlier_index == "official" else c)
        mins, maxs, rows = _rotate_and_extremes(z, rot.to(z.device, work), spare)
        z, spare = spare, z
        total = total @ rot
    return RotationResult(best, best_k, scores)


def zigzag_permutation(channel_max: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order balancing outlier mass over blocks (LongTensor (C,), new[j] = old[perm[j]]).

    Channels sorted by max descending (stable) are dealt to blocks 0..K-1, K-1..0, 0..K-1, ...
    so the end blocks get two in a row; each block then lists its channels by max descending."""
    c = channel_max.shape[0]
    if c % block:
        raise ValueError(f"{c} channels are not a multiple of the block size {block}")
    k = c // block
    order = torch.sort(channel_max.detach().cpu(), descending=True, stable=True).indices
    phase = torch.arange(c) % (2 * k)
    block_of_rank = torch.where(phase < k, phase, 2 * k - 1 - phase)
    return order[torch.sort(block_of_rank, stable=True).indices]


def apply_block_rotation(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(r, ..., r) without materialising it; r is cast to x's dtype and device."""
    n = r.shape[0]
    if x.shape[-1] % n:
        raise ValueError(f"{x.shape[-1]} channels are not a multiple of the block size {n}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // n, n)
    return (blocks @ r.to(x.device, x.dtype)).reshape(x.shape)


def block_diag_matrix(r: torch.Tensor, k: int) -> torch.Tensor:
    """The C x C matrix blockdiag(r, ..., r) with k copies (for tests and Hessians)."""
    return torch.block_diag(*[r] * k)


def largest_pow2_block(channels: int, preferred: int = 128) -> int:
    """`preferred` if it divides `channels`, else the largest power of two dividing `channels`
    that is <= preferred (SmolLM2's hidden 576 -> 64)."""
    if channels % preferred == 0:
        return preferred
    block = 1
    while block * 2 <= preferred and channels % (block * 2) == 0:
        block *= 2
    return block


class DuQuantTransform(NamedTuple):
    r1: torch.Tensor  # (n, n) float64
    perm: torch.Tensor | None  # (C,) long, applied as x[..., perm]
    r2: torch.Tensor | None  # (n, n) float64


def duquant_transform(x: torch.Tensor, block: int, steps: int = 256, outlier_index: str = "official",
                      generator: torch.Generator | None = None, permute: bool = True) -> DuQuantTransform:
    """Search (R1, P, R2) on (already smoothed) activations x (..., C).

    R1 on x; P = zigzag of the per-channel absmax of x R1; R2 on x R1 P with a new randomised
    base from the same generator. permute=False stops after R1 (perm = r2 = None: the paper's
    "smooth + R1" ablation; R2 without a permutation would only continue R1's search)."""
    r1 = greedy_rotation(x, block, steps, outlier_index, generator).matrix
    if not permute:
        return DuQuantTransform(r1, None, None)
    x1 = apply_block_rotation(x.detach().float() if x.dtype != torch.float64 else x.detach(), r1)
    perm = zigzag_permutation(x1.abs().reshape(-1, x1.shape[-1]).amax(0), block)
    r2 = greedy_rotation(x1[..., perm.to(x1.device)], block, steps, outlier_index, generator).matrix
    return DuQuantTransform(r1, perm, r2)


def apply_duquant(x: torch.Tensor, r1: torch.Tensor, perm: torch.Tensor | None = None,
                  r2: torch.Tensor | None = None) -> torch.Tensor:
    """x T with T = blockdiag(R1) P blockdiag(R2). Applied to a weight [out, in] it transforms
    the input columns, which is the weight's side of the identity in the module docstring."""
    x = apply_block_rotation(x, r1)
    if perm is not None:
        x = x[..., perm.to(x.device)]
    if r2 is not None:
        x = apply_block_rotation(x, r2)
    return x


def invert_duquant(y: torch.Tensor, r1: torch.Tensor, perm: torch.Tensor | None = None,
                   r2: torch.Tensor | None = None) -> torch.Tensor:
    """y T^T, the inverse of apply_duquant (T is orthogonal)."""
    if r2 is not None:
        y = apply_block_rotation(y, r2.T)
    if perm is not None:
        y = y[..., torch.argsort(perm).to(y.device)]
    return apply_block_rotation(y, r1.T)


def duquant_matrix(channels: int, r1: torch.Tensor, perm: torch.Tensor | None = None,
                   r2: torch.Tensor | None = None) -> torch.Tensor:
    """T materialised as a C x C float64 matrix (x @ T == apply_duquant(x, ...))."""
    return apply_duquant(torch.eye(channels, dtype=torch.float64), r1, perm, r2)
