"""GPTQ (quant.gptq.GPTQ) against an independent, naive optimal-brain-quantizer loop.

The reference side is written here in NumPy float64 and uses nothing from the code under test:

- H = 2/N * X^T X over all N token rows (what add_batch accumulates, over several batches);
- an input channel that never fires (H[j, j] == 0) gets H[j, j] = 1 and its weight column 0;
- dampening: percdamp * mean(diag(H)) added to the diagonal;
- Hinv = inverse(H), plainly;
- for every column j in order (GPTQ's default order, or with act_order by decreasing diag(H) before
  dampening, ties in stored order):
  q_j = fake-quantize(w_j) with the fixed per-(row, group) scale/zero on the grid,
  err = (w_j - q_j) / Hinv[j, j], w_k -= err * Hinv[j, k] for k > j,
  then Hinv <- Hinv - Hinv[:, j] Hinv[j, :] / Hinv[j, j] (column j eliminated); with act_order the
  update reaches the columns not yet visited, and each column keeps its stored group's scale.

That is blocksize-1 GPTQ without the Cholesky trick; the code's lazy-batch blocks and upper
Cholesky factor of H^-1 must give the same weights. The grids' formulas (full, reference,
symmetric; dequantization (q - zero) * scale) are written out below, as are the scales.

Tolerance: the results are grid points, so an agreement to 1e-5 relative means the same code
was chosen for every weight (a neighbouring grid point is a whole step away). The code runs in
float32 and the reference in float64; with the fixed seeds here no weight lies within rounding
noise of a rounding boundary, so the count of different codes is asserted to be exactly 0.
"""
import numpy as np
import pytest
import torch

from quant.gptq import GPTQ

GRID_CODES = {  # grid -> (qmin, qmax) as functions of the bit width, from quant/quantizer.py's docstring
    "full": lambda b: (0, 2**b - 1),
    "reference": lambda b: (-(2 ** (b - 1)), 2 ** (b - 1) - 1),
    "symmetric": lambda b: (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1),
}


def scale_zero(lo, hi, bits, grid):
    """Per-group scale and zero point of a grid for the range [lo, hi] (plain formulas)."""
    if grid == "full":  # 2^b - 1 steps over [lo, hi]
        scale = max((hi - lo) / (2**bits - 1), 1e-8)
        return scale, np.round(-lo / scale)
    if grid == "reference":  # 2^b steps; zero point centres the signed codes
        scale = max((hi - lo) / 2**bits, 1e-8)
        return scale, np.round(-(hi + lo) / (2 * scale))
    scale = max(max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 1e-8)  # symmetric
    return scale, 0.0


def weight_scales(W, sizes, bits, grid):
    """(rows, groups) scale and zero from each (row, group)'s min/max, 0 included (GPTQ's convention)."""
    rows = W.shape[0]
    scale, zero = np.zeros((rows, len(sizes))), np.zeros((rows, len(sizes)))
    for r in range(rows):
        start = 0
        for g, size in enumerate(sizes):
            part = W[r, start:start + size]
            scale[r, g], zero[r, g] = scale_zero(min(part.min(), 0.0), max(part.max(), 0.0), bits, grid)
            start += size
    return scale, zero


def quantize_value(w, scale, zero, bits, grid):
    """Fake-quantize (elementwise over arrays): code = clamp(round(w / scale) + zero), then (code - zero) * scale."""
    qmin, qmax = GRID_CODES[grid](bits)
    code = np.clip(np.round(w / scale) + zero, qmin, qmax)
    return (code - zero) * scale


def naive_gptq(X, W, scale, zero, sizes, bits, grid, percdamp, act_order=False):
    """Column-by-column OBQ update in float64 (see the module docstring)."""
    X, W = X.astype(np.float64), W.astype(np.float64).copy()
    n, columns = X.shape
    H = 2.0 / n * X.T @ X
    for j in range(columns):
        if H[j, j] == 0:  # a dead input: its weights cannot matter, the code zeroes them
            H[j, j] = 1.0
            W[:, j] = 0.0
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(columns)
    H += percdamp * np.mean(np.diag(H)) * np.eye(columns)
    Hinv = np.linalg.inv(H)
    group_of = [g for g, size in enumerate(sizes) for _ in range(size)]
    Q = np.zeros_like(W)
    for step, j in enumerate(order):
        g = group_of[j]
        Q[:, j] = quantize_value(W[:, j], scale[:, g], zero[:, g], bits, grid)  # every row at once
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        later = order[step + 1:]
        W[:, later] -= np.outer(err, Hinv[j, later])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


def codes_of(Q, scale, zero, sizes):
    """Integer codes of a grid-valued weight (for counting weights that landed elsewhere)."""
    s = np.repeat(scale, sizes, axis=1)
    z = np.repeat(zero, sizes, axis=1)
    return np.round(Q / s + z)


def make_layer(seed, rows=32, columns=24, tokens=200, dead=()):
    """Inputs of rank 6 plus noise: H is ill-conditioned enough that the dampening and the error
    feedback matter (here percdamp 0.012 instead of 0.01 moves ~2% of the codes; GPTQ moves ~18%
    of them off round-to-nearest), so the comparison below can tell such differences apart."""
    rng = np.random.default_rng(seed)
    low_rank = rng.standard_normal((tokens, 6)) @ rng.standard_normal((6, columns))
    X = (low_rank + 0.3 * rng.standard_normal((tokens, columns))).astype(np.float32)
    X[:, list(dead)] = 0.0
    W = rng.standard_normal((rows, columns)).astype(np.float32)
    return X, W


def run_code(X, W, scale, zero, sizes, bits, grid, blocksize, percdamp=0.01, act_order=False, codes=False):
    gptq = GPTQ(X.shape[1])
    for chunk in np.array_split(X, [37, 120]):  # uneven batches: the running mean must come out as 2/N X^T X
        gptq.add_batch(torch.from_numpy(chunk))
    run = gptq.quantize_codes if codes else gptq.quantize
    out = run(torch.from_numpy(W), torch.from_numpy(scale).float(), torch.from_numpy(zero).float(), bits,
              group_sizes=None if sizes is None else tuple(sizes), blocksize=blocksize, percdamp=percdamp, grid=grid,
              act_order=act_order)
    return tuple(t.numpy() for t in out) if codes else out.numpy()


def test_hessian_is_two_over_n_xtx():
    X, _ = make_layer(0)
    gptq = GPTQ(X.shape[1])
    for chunk in np.array_split(X, [37, 120]):
        gptq.add_batch(torch.from_numpy(chunk))
    X64 = X.astype(np.float64)
    expected = 2.0 / X.shape[0] * X64.T @ X64
    np.testing.assert_allclose(gptq.hessian.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


CASES = [  # (grid, bits, group sizes or None for per row, blocksize, dead inputs)
    ("full", 3, None, 128, ()),
    ("full", 4, None, 1, ()),
    ("full", 3, (5, 11, 8), 7, ()),  # uneven groups straddling the lazy-batch blocks
    ("reference", 3, None, 128, ()),
    ("reference", 4, (8, 8, 8), 5, ()),
    ("reference", 3, (3, 13, 8), 128, ()),
    ("symmetric", 4, (6, 18), 8, ()),
    ("full", 3, (10, 14), 4, (2, 17)),  # dead input channels
]


@pytest.mark.parametrize("grid,bits,groups,blocksize,dead", CASES)
def test_gptq_equals_naive_column_loop(grid, bits, groups, blocksize, dead):
    X, W = make_layer(seed=bits * 10 + blocksize, dead=dead)
    sizes = groups or (W.shape[1],)
    scale, zero = weight_scales(W.astype(np.float64), sizes, bits, grid)
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)  # what the code receives, exactly
    expected = naive_gptq(X, W, scale.astype(np.float64), zero.astype(np.float64), sizes, bits, grid, 0.01)
    got = run_code(X, W, scale, zero, groups, bits, grid, blocksize)

    mismatched = codes_of(got, scale, zero, sizes) != codes_of(expected, scale, zero, sizes)
    assert int(mismatched.sum()) == 0, f"{int(mismatched.sum())} of {mismatched.size} weights on another code"
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # a real sweep: error feedback moved some weights off their round-to-nearest code
    rtn = quantize_value(W, np.repeat(scale, sizes, axis=1), np.repeat(zero, sizes, axis=1), bits, grid)
    assert (np.abs(got - rtn) > 1e-6).mean() > 0.1
    if dead:
        assert np.all(got[:, list(dead)] == 0)


def test_the_comparison_can_tell_a_small_change_apart():
    """Negative control: the same reference with percdamp 0.012 instead of the code's 0.01 puts
    some weights on other codes, so the exact agreement above is not vacuous."""
    X, W = make_layer(seed=3)
    sizes = (W.shape[1],)
    scale, zero = weight_scales(W.astype(np.float64), sizes, 3, "full")
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)
    got = run_code(X, W, scale, zero, None, 3, "full", 128, percdamp=0.01)
    same = naive_gptq(X, W, scale.astype(np.float64), zero.astype(np.float64), sizes, 3, "full", 0.01)
    other = naive_gptq(X, W, scale.astype(np.float64), zero.astype(np.float64), sizes, 3, "full", 0.012)
    assert (codes_of(got, scale, zero, sizes) != codes_of(same, scale, zero, sizes)).sum() == 0
    assert (codes_of(got, scale, zero, sizes) != codes_of(other, scale, zero, sizes)).sum() >= 3


ACT_ORDER_CASES = [  # (grid, bits, group sizes, blocksize, dead inputs): groups straddle the blocks
    ("full", 3, None, 128, ()),
    ("full", 3, (5, 11, 8), 7, ()),
    ("symmetric", 4, (6, 18), 8, (3,)),
    ("reference", 4, (8, 8, 8), 1, ()),
]


@pytest.mark.parametrize("grid,bits,groups,blocksize,dead", ACT_ORDER_CASES)
def test_act_order_equals_naive_loop_in_its_order(grid, bits, groups, blocksize, dead):
    X, W = make_layer(seed=bits * 7 + blocksize, dead=dead)
    X = X * np.linspace(0.3, 3.0, X.shape[1], dtype=np.float32)[::-1].copy()  # energies far from the stored order
    sizes = groups or (W.shape[1],)
    scale, zero = weight_scales(W.astype(np.float64), sizes, bits, grid)
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)
    expected = naive_gptq(X, W, scale.astype(np.float64), zero.astype(np.float64), sizes, bits, grid, 0.01,
                          act_order=True)
    got, codes = run_code(X, W, scale, zero, groups, bits, grid, blocksize, act_order=True, codes=True)
    assert int((codes_of(got, scale, zero, sizes) != codes_of(expected, scale, zero, sizes)).sum()) == 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # the codes come back in the stored order: they dequantize to the weight with each column's own group
    np.testing.assert_allclose((codes - np.repeat(zero, sizes, axis=1)) * np.repeat(scale, sizes, axis=1), got,
                               rtol=0, atol=1e-6 * np.abs(got).max())
    if dead:
        assert np.all(got[:, list(dead)] == 0)
    # negative control: the stored order puts some weights on other codes
    plain = run_code(X, W, scale, zero, groups, bits, grid, blocksize)
    assert (codes_of(plain, scale, zero, sizes) != codes_of(got, scale, zero, sizes)).sum() >= 3


def test_act_order_refuses_a_column_quantizer():
    X, W = make_layer(seed=1)
    gptq = GPTQ(X.shape[1])
    gptq.add_batch(torch.from_numpy(X))
    scale, zero = torch.ones(W.shape[0], 1), torch.zeros(W.shape[0], 1)
    with pytest.raises(ValueError, match="column_quantizer"):
        gptq.quantize(torch.from_numpy(W), scale, zero, 3, act_order=True, column_quantizer=lambda w, c, g: w)
