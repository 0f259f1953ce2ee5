"""Hadamard matrices of orders m * 2^k (Paley I and II for m), randomized Hadamard, and the
random-orthogonal fallback where no construction is known; model-free, built in float64.

QuaRot (Ashkboos et al., 2024) rotates with H of the layer's width; widths that are not powers of
two (SmolLM2: 576 = 36 * 16, MLP 1536 = 12 * 128) need a Hadamard of order m for the odd part,
Kronecker-multiplied with a Sylvester matrix of order 2^k. Two classic constructions from a prime q:

- Paley I, q = 3 mod 4: order q + 1 (12 from 11, 20 from 19, 60 from 59);
- Paley II, q = 1 mod 4: order 2(q + 1) (36 from 17, 28 from 13).

Prime powers (GF(q^k) arithmetic) are not built: those orders fall back to a random orthogonal
matrix, and the caller records which was used.
"""
from __future__ import annotations

import math

import torch

from .rotation import random_orthogonal, sylvester_hadamard


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def _bordered(q: int, sign: float) -> torch.Tensor:
    """[[0, 1^T], [sign * 1, Q]]: the Jacobsthal matrix with its border (order q + 1)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = sign
    s[1:, 1:] = _jacobsthal(q)
    return s


def paley_i(q: int) -> torch.Tensor:
    """Unnormalised (+-1) Hadamard matrix of order q + 1, q a prime = 3 mod 4: I + S, S skew."""
    if not _is_prime(q) or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    return torch.eye(q + 1, dtype=torch.float64) + _bordered(q, -1.0)


def paley_ii(q: int) -> torch.Tensor:
    """Unnormalised (+-1) Hadamard matrix of order 2(q + 1), q a prime = 1 mod 4:
    C x [[1, -1], [-1, -1]] + I x [[1, 1], [1, -1]] with C the symmetric conference matrix."""
    if not _is_prime(q) or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    c = _bordered(q, 1.0)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _base(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order m from the constructions here, or None."""
    if m in (1, 2):
        return sylvester_hadamard(m) * math.sqrt(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley_i(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley_ii(m // 2 - 1)
    return None


def hadamard(n: int) -> tuple[torch.Tensor, int] | None:
    """(H, m): a normalised Hadamard matrix of order n = m * 2^k (H H^T = I, float64) built as
    H_m x Sylvester(2^k) with the smallest m that has a construction; None if there is none."""
    if n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive order, got {n}")
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):  # the largest power-of-two factor first: smallest m
        m = n >> k
        base = _base(m)
        if base is not None:
            return torch.kron(base, sylvester_hadamard(1 << k) * math.sqrt(1 << k)) / math.sqrt(n), m
    return None


def orthogonal_mixer(n: int, generator: torch.Generator, randomized: bool = True) -> tuple[torch.Tensor, str]:
    """(Q, kind): D H (random signs D on H's rows; QuaRot's randomized Hadamard) where a Hadamard of
    order n is built here ("hadamard(m*2^k)"), else a Haar random orthogonal matrix ("random").
    ``randomized=False`` keeps H itself. float64."""
    found = hadamard(n)
    if found is None:
        return random_orthogonal(n, generator), "random"
    h, m = found
    kind = f"hadamard({m}*{n // m})" if m > 1 else f"hadamard({n})"
    if not randomized:
        return h, kind
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    return signs.unsqueeze(1) * h, "randomized " + kind
