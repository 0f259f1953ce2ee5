"""Per-cluster / per-group fake quantization (quant.quantizer) against plain Python loops.

The reference side loops over groups and elements and evaluates, with float32 scalars, the
formulas stated in quant/quantizer.py's docstring (written out again here, not imported):

- ``full``:      scale = (max - min) / (2^b - 1),   zero = round(-min / scale),              codes 0 .. 2^b - 1
- ``reference``: scale = (max - min) / 2^b,         zero = round(-(max + min) / (2 scale)),  codes -2^(b-1) .. 2^(b-1) - 1
- ``symmetric``: scale = max(|min|, |max|) / (2^(b-1) - 1), zero = 0,                        codes -(2^(b-1) - 1) .. 2^(b-1) - 1
- ``reference_clamped``: ``reference`` with the RPTQ reference code's scale in [1e-4, 1e4] and zero in [-1e4, 1e4]
- every other scale at least 1e-8; x -> (clamp(round(x / scale) + zero) - zero) * scale, round half to even.

Checked: static activation quantizers (ActQuantizer) per tensor and per uneven cluster layout,
with a clipping ratio; dynamic ones per token and per sequence; weight RTN per (row, uneven
input group) with and without 0 forced into the range. Each is the same float32 arithmetic in
the same order, so the comparison is bit-exact (assert_array_equal).
"""
import numpy as np
import pytest
import torch

from quant.quantizer import ActQuantizer, QuantSpec, WeightSpec, quantize_weight_rtn

F = np.float32
GRIDS = ("full", "reference", "reference_clamped", "symmetric")


def code_limits(bits, grid):
    if grid == "full":
        return 0, 2**bits - 1
    if grid in ("reference", "reference_clamped"):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def params(lo, hi, bits, grid):
    """float32 scale and zero of one group's range [lo, hi]."""
    lo, hi = F(lo), F(hi)
    if grid == "full":
        scale = max((hi - lo) / F(2**bits - 1), F(1e-8))
        return scale, np.round(-lo / scale)
    if grid == "reference":
        scale = max((hi - lo) / F(2**bits), F(1e-8))
        return scale, np.round(-(hi + lo) / (F(2) * scale))
    if grid == "reference_clamped":
        scale = min(max((hi - lo) / F(2**bits), F(1e-4)), F(1e4))  # the RPTQ reference code's clamps
        return scale, np.round(min(max(-(hi + lo) / (F(2) * scale), F(-1e4)), F(1e4)))
    scale = max(max(abs(lo), abs(hi)) / F(2 ** (bits - 1) - 1), F(1e-8))
    return scale, F(0)


def quantize(x, scale, zero, bits, grid):
    qmin, qmax = code_limits(bits, grid)
    code = min(max(np.round(F(x) / scale) + zero, F(qmin)), F(qmax))
    return (code - zero) * scale


def group_slices(sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


def reference_static(x, cmin, cmax, sizes, bits, grid, clip):
    """x: (..., channels); one range per group from the calibrated per-channel ranges."""
    out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
    for cols in group_slices(sizes):
        lo = min(cmin[cols]) * F(clip)
        hi = max(cmax[cols]) * F(clip)
        scale, zero = params(lo, hi, bits, grid)
        for t in range(flat_x.shape[0]):
            for c in range(cols.start, cols.stop):
                flat_out[t, c] = quantize(flat_x[t, c], scale, zero, bits, grid)
    return out


def reference_dynamic(x, sizes, bits, grid, per):
    """x: (batch, tokens, channels); per='token': one range per token and group;
    per='sequence': one range per batch element and group, over all its tokens."""
    out = np.empty_like(x)
    batch, tokens, _ = x.shape
    for b in range(batch):
        for cols in group_slices(sizes):
            token_sets = [[t] for t in range(tokens)] if per == "token" else [list(range(tokens))]
            for ts in token_sets:
                values = [x[b, t, c] for t in ts for c in range(cols.start, cols.stop)]
                scale, zero = params(min(values), max(values), bits, grid)
                for t in ts:
                    for c in range(cols.start, cols.stop):
                        out[b, t, c] = quantize(x[b, t, c], scale, zero, bits, grid)
    return out


def reference_weight(w, sizes, bits, grid, include_zero, clip):
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for cols in group_slices(sizes):
            lo, hi = min(w[r, cols]), max(w[r, cols])
            if include_zero:
                lo, hi = min(lo, F(0)), max(hi, F(0))
            if clip != 1.0:
                lo, hi = lo * F(clip), hi * F(clip)
            scale, zero = params(lo, hi, bits, grid)
            for c in range(cols.start, cols.stop):
                out[r, c] = quantize(w[r, c], scale, zero, bits, grid)
    return out


def activations(seed, shape=(2, 5, 12)):
    """Channels with very different ranges (RPTQ's setting), float32."""
    rng = np.random.default_rng(seed)
    spread = np.linspace(0.2, 6.0, shape[-1]) * rng.permutation(shape[-1]) / shape[-1]
    return (rng.standard_normal(shape) * (spread + 0.1) + rng.standard_normal(shape[-1])).astype(F)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sizes,bits,clip", [(None, 4, 1.0), ((3, 5, 4), 4, 1.0), ((3, 5, 4), 3, 0.9),
                                             ((4, 4, 4), 4, 1.0), ((1, 7, 4), 8, 1.0)])
def test_static_activation_quantizer(grid, sizes, bits, clip):
    calib = activations(seed=1)
    cmin, cmax = calib.min(axis=(0, 1)), calib.max(axis=(0, 1))
    x = activations(seed=2) * F(1.3)  # some values beyond the calibrated ranges: clamped
    quantizer = ActQuantizer(QuantSpec(bits=bits, group_sizes=sizes, grid=grid, clip=clip),
                             torch.from_numpy(cmin), torch.from_numpy(cmax))
    got = quantizer(torch.from_numpy(x)).numpy()
    if sizes is None:  # per tensor: one range over every channel
        expected = reference_static(x, np.array([cmin.min()]).repeat(12), np.array([cmax.max()]).repeat(12), (12,),
                                    bits, grid, clip)
    else:
        expected = reference_static(x, cmin, cmax, sizes, bits, grid, clip)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 8  # not a degenerate case: many levels in use


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("per", ["token", "sequence"])
@pytest.mark.parametrize("sizes", [None, (2, 6, 4), (1, 11)])  # (1, 11): a one-channel group per token is constant
def test_dynamic_activation_quantizer(grid, per, sizes):
    x = activations(seed=3)
    got = ActQuantizer(QuantSpec(bits=4, group_sizes=sizes, dynamic=per, grid=grid))(torch.from_numpy(x)).numpy()
    expected = reference_dynamic(x, sizes or (12,), 4, grid, per)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sizes,include_zero,clip", [(None, True, 1.0), ((5, 2, 9), True, 1.0),
                                                     ((5, 2, 9), False, 1.0), ((4, 4, 8), False, 0.85),
                                                     ((1, 15), False, 1.0)])
def test_weight_rtn(grid, sizes, include_zero, clip):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((6, 16)) * np.linspace(0.5, 3, 16) + 0.4).astype(F)  # mostly positive rows
    spec = WeightSpec(bits=3, group_sizes=sizes, grid=grid, include_zero=include_zero, clip=clip)
    got = quantize_weight_rtn(torch.from_numpy(w), sizes, 3, spec).numpy()
    expected = reference_weight(w, sizes or (16,), 3, grid, include_zero, clip)
    np.testing.assert_array_equal(got, expected)


def test_hand_worked_reference_grid():
    """One group worked on paper: range [-1, 2.2], 2 bits, reference grid: scale 3.2 / 4 = 0.8,
    zero round(-1.2 / 1.6) = round(-0.75) = -1, codes -2..1 -> levels (-2+1)*0.8 = -0.8, 0, 0.8, 1.6
    (2.2 - scale = 1.4 is the top of the range the grid spans, and 1.6 its nearest level above)."""
    spec = QuantSpec(bits=2, group_sizes=(3,), grid="reference")
    q = ActQuantizer(spec, torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([0.0, 2.2, 0.0]))
    x = torch.tensor([-1.0, -0.5, 0.3, 0.5, 1.3, 2.2])
    got = torch.stack([q(v.repeat(3))[0] for v in x])  # the same value in all three channels
    np.testing.assert_allclose(got.numpy(), [-0.8, -0.8, 0.0, 0.8, 1.6, 1.6], rtol=1e-6)
