"""Every quantizer hands back its integers: codes that lie in the grid's code range and dequantize
(quant.grid's (code - zero) * scale) to the fake-quantized output bit for bit."""
import pytest
import torch

from quant.bcq import bcq_quantize
from quant.gptq import GPTQ
from quant.gptqt import GPTQTConfig, codes_of, gptqt_quantize
from quant.grid import GRIDS, code_range, dequantize, fake_quant, quantize
from quant.packing import PackedAffine
from quant.quantizer import (ActQuantizer, QuantSpec, WeightSpec, dequantize_weight, fixed_groups, quantize_weight_rtn,
                             weight_codes, weight_group_params)

COLS = 40
LAYOUTS = {"per row": None, "fixed groups": fixed_groups(COLS, 16), "clusters": (7, 1, 12, 20)}  # one 1-channel


def _weight(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, COLS, generator=gen) * torch.exp(torch.randn(COLS, generator=gen))
    w[:, 7] = 0.37  # the one-channel cluster: a constant group
    w[3] = 0  # an all-zero row
    return w


def _in_range(codes, bits, grid):
    qmin, qmax = code_range(bits, grid)
    return not codes.dtype.is_floating_point and int(codes.min()) >= qmin and int(codes.max()) <= qmax


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scales", ["fp32", "fp16", "sf8"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_weight_codes_dequantize_to_the_fake_quantized_weight(grid, layout, scales, bits):
    w, sizes = _weight(bits), LAYOUTS[layout]
    for include_zero, clip in ((True, 1.0), (False, 0.85)):
        spec = WeightSpec(bits, sizes, grid, include_zero, clip, scales == "fp16", scales == "sf8")
        codes, scale, zero = weight_codes(w, sizes, bits, spec)
        assert _in_range(codes, bits, grid)
        assert torch.equal(dequantize_weight(codes, scale, zero, sizes), quantize_weight_rtn(w, sizes, bits, spec))
        for got, want in zip((scale, zero), weight_group_params(w, sizes, bits, spec)):
            assert torch.equal(got, want)  # the grid packing stores: (rows, groups)


_ACT_SPECS = {
    "static per tensor": QuantSpec(4),
    "static per group": QuantSpec(3, (8, 40), grid="reference", clip=0.9),
    "static symmetric groups": QuantSpec(8, (16, 32), grid="symmetric"),
    "dynamic per token": QuantSpec(4, dynamic="token"),
    "dynamic per token, groups": QuantSpec(4, (24, 24), dynamic="token", grid="symmetric"),
    "dynamic per sequence": QuantSpec(4, dynamic="sequence"),
    "dynamic per sequence, groups": QuantSpec(3, (16, 32), dynamic="sequence", grid="reference"),
    "dynamic per token, QuaRot's grid, clipped": QuantSpec(4, dynamic="token", grid="quarot", clip=0.9),
}


@pytest.mark.parametrize("name", _ACT_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_activation_codes_dequantize_to_the_forward(name, dtype):
    spec = _ACT_SPECS[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 48, generator=gen) * 3
    x[..., 5] *= 40  # an outlier channel
    act = ActQuantizer(spec, x.amin((0, 1)), x.amax((0, 1)))
    assert act.spec.static == (spec.dynamic is None)
    x = x.to(dtype)
    codes, scale, zero = act.quantize(x)
    assert _in_range(codes, spec.bits, spec.grid) and codes.shape == x.shape
    assert torch.equal(act.dequantize(codes, scale, zero, x.dtype), act(x))


def test_only_uniform_quantizers_have_codes_and_only_calibrated_ones_are_static():
    for spec in (QuantSpec(), QuantSpec(8, unit_grid=True)):
        assert not spec.static
        with pytest.raises(ValueError, match="no integer codes"):
            ActQuantizer(spec).quantize(torch.rand(2, 4))


def _gptq(x):
    gptq = GPTQ(x.shape[1])
    gptq.add_batch(x)
    return gptq


def _inputs(seed=2):
    x = torch.randn(256, COLS, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 10
    return x


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_codes_dequantize_to_its_weight(grid, layout, bits):
    w, x, sizes = _weight(), _inputs(), LAYOUTS[layout]
    spec = WeightSpec(bits, sizes, grid)
    scale, zero = weight_group_params(w, sizes, bits, spec)
    w_hat, codes = _gptq(x).quantize_codes(w, scale, zero, bits, sizes, blocksize=16, grid=grid)
    assert _in_range(codes, bits, grid)
    assert torch.equal(dequantize_weight(codes, scale, zero, sizes), w_hat)
    assert torch.equal(_gptq(x).quantize(w, scale, zero, bits, sizes, blocksize=16, grid=grid), w_hat)
    qmin = 0 if grid == "full" else -(2 ** (bits - 1))  # the container's code origin (signed grids share one)
    packed = PackedAffine.from_codes(codes, scale, zero, bits, sizes, qmin=qmin, weight_hat=w_hat)
    assert torch.equal(packed.integer_codes(), codes.long())  # packed as handed over, not recovered


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_gptq", [True, False])
def test_gptqt_binary_codes_rebuild_its_weight(variant, layout, with_gptq):
    w, x, sizes = _weight(), _inputs(), LAYOUTS[layout]
    gptq = _gptq(x) if with_gptq else None
    cfg = GPTQTConfig(bits=2, variant=variant, blocksize=16, gammas=(0.8, 1.0, 1.2))
    w_hat, coded = gptqt_quantize(w, gptq, cfg, sizes, hessian=_gptq(x).hessian)
    assert coded.bits.dtype == torch.bool and coded.bits.shape == (cfg.bits, *w.shape)
    assert torch.equal(coded.dequantize(), w_hat)
    patterns = sum(coded.bits[i].long() << i for i in range(cfg.bits))  # in [0, 2^k) by construction
    group_of = torch.repeat_interleave(torch.arange(coded.alpha.shape[1]), torch.tensor(sizes or (COLS,)))
    levels = coded.levels()[:, group_of]  # (rows, cols, 2^k): each weight's own group's levels
    assert torch.equal(levels.gather(-1, patterns[..., None])[..., 0].float(), w_hat)


def test_gptqt_step_one_codes_are_the_grids():
    w = _weight()
    scale, zero = weight_group_params(w, None, 3)
    codes = codes_of(w, scale, zero, 3)
    assert _in_range(codes, 3, "full") and torch.equal(codes, quantize(w, scale, zero, 3).long())
    assert torch.equal(dequantize(codes.float(), scale, zero), fake_quant(w, scale, zero, 3))


@pytest.mark.parametrize("layout", ["per row", "fixed groups"])
def test_bcq_binary_codes_rebuild_its_weight(layout):
    w_hat, coded = bcq_quantize(_weight(), 3, LAYOUTS[layout], iters=3)
    assert coded.bits.dtype == torch.bool and torch.equal(coded.dequantize(), w_hat)


@pytest.mark.parametrize("bits", [4, 8])  # at clip 0.9 the extra code is reached from 4 bits up
def test_quarot_grid_is_the_symmetric_scale_on_twos_complement_codes(bits):
    """QuaRot's sym_quant: scale clip * absmax / (2^(b-1) - 1), codes clamped to -2^(b-1) .. 2^(b-1) - 1;
    a clipped token's negative side reaches the extra code, and nowhere else does it differ."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(bits)) * 2
    x[::2] = -x[::2]  # half the tokens have their absmax on the negative side
    quarot, symmetric = (ActQuantizer(QuantSpec(bits, dynamic="token", grid=grid, clip=0.9))
                         for grid in ("quarot", "symmetric"))
    codes, scale, zero = quarot.quantize(x)
    sym_codes, sym_scale, _ = symmetric.quantize(x)
    assert code_range(bits, "quarot") == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) and _in_range(codes, bits, "quarot")
    assert torch.equal(scale, sym_scale) and not bool(zero.any())
    assert int(codes.min()) == -(2 ** (bits - 1))  # clip 0.9: the extra code is used
    assert torch.equal(quarot.dequantize(codes, scale, zero), quarot(x))
    assert torch.equal(quarot(x), fake_quant(x, scale, zero, bits, "quarot"))
    differs = codes != sym_codes
    assert bool(differs.any()) and bool((codes[differs] == -(2 ** (bits - 1))).all())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_clip_searched_ranges_keep_codes_on_the_grid(grid, layout):
    """QuaRot's clipping search only narrows the ranges: RTN and GPTQ codes stay in range and exact."""
    w, x, sizes = _weight(), _inputs(), LAYOUTS[layout]
    spec = WeightSpec(4, sizes, grid, clip_search=True)
    codes, scale, zero = weight_codes(w, sizes, 4, spec)
    assert _in_range(codes, 4, grid)
    assert torch.equal(dequantize_weight(codes, scale, zero, sizes), quantize_weight_rtn(w, sizes, 4, spec))
    w_hat, codes = _gptq(x).quantize_codes(w, scale, zero, 4, sizes, blocksize=16, grid=grid)
    assert _in_range(codes, 4, grid) and torch.equal(dequantize_weight(codes, scale, zero, sizes), w_hat)
