"""Method formulas and decisions: SmoothQuant's scale, FPTQ's LAE and layerwise rule, the
presets' quantizers, and the reference's arithmetic (grid, EMA, features, dynamic ranges)."""
import copy
import math

import pytest
import torch

from models.registry import adapter_for
from quant.quantizer import ActQuantizer, QuantSpec, affine_params, fake_quant
from rptq.config import QuantConfig
from rptq.methods.fptq import DYNAMIC, LAE_STATIC, STATIC, FPTQSettings, lae_scale, strategy
from rptq.methods.smoothquant import smoothing_scale
from models.execution import wrap_blocks
from rptq.pipeline import quantize_model
from rptq.stats import ChannelObserver
from tests.helpers import inject_opt_outliers, tiny_opt


def test_smoothing_scale_formula():
    a, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scale(a, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0  # a dead channel still gets a positive scale


def test_lae_maps_channel_max_to_log2():
    m = torch.tensor([0.5, 2.0, 10.0, 150.0, 1e-9])
    s = lae_scale(m)
    assert torch.allclose(m[:4] / s[:4], torch.log2(2 + m[:4]), rtol=1e-6)
    assert bool((s > 1)[m > 2].all()) and bool((s <= 1)[m <= 2].all()) and bool((s >= 1e-5).all())


@pytest.mark.parametrize("r,norm_fed,want", [(10, True, STATIC), (100, True, LAE_STATIC), (1000, True, DYNAMIC),
                                             (100, False, DYNAMIC), (15, False, STATIC), (150, True, LAE_STATIC)])
def test_fptq_layerwise_rule(r, norm_fed, want):
    assert strategy(r, norm_fed, 15.0, 150.0) == want


def _opt():
    return inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1)


def test_lae_after_folding_channel_max_is_log2_of_before():
    """Measured on the transformed block: channel j's calibration max|X| is log2(2 + m_j)."""
    model = _opt()
    ids = torch.randint(4, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="fptq", transforms=("lae",), abits_policy="fptq", wbits=16, abits=16).using(
        FPTQSettings(v0=0.0, v1=1e9))
    fp = copy.deepcopy(model)
    adapter = adapter_for(fp.config)
    wrap_blocks(fp, adapter)
    obs_before = ChannelObserver()
    adapter.layers(fp)[0].taps["qkv_in"] = obs_before
    with torch.no_grad():
        fp(ids)
    quant = copy.deepcopy(model)
    report = quantize_model(quant, adapter, ids, cfg, progress=False)
    obs_after = ChannelObserver()
    adapter.layers(quant)[0].taps["qkv_in"] = obs_after
    with torch.no_grad():
        quant(ids)
    m = obs_before.absmax()
    assert torch.allclose(obs_after.absmax(), torch.log2(2 + m), rtol=1e-4)
    assert report.layers[0].decisions["qkv_in"]["strategy"] == LAE_STATIC
    assert report.layers[0].decisions["out_in"]["strategy"] == DYNAMIC  # no norm feeds out_proj


def test_fptq_preset_quantizers():
    model = _opt()
    ids = torch.randint(4, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(method="fptq", transforms=("lae",), abits_policy="fptq", wbits=4, abits=8, grid="full",
                      w_quantizer="rtn", w_group_size=16)
    quant = copy.deepcopy(model)
    report = quantize_model(quant, adapter_for(quant.config), ids, cfg, progress=False)
    block = quant.model.decoder.layers[0]
    for point, decision in report.layers[0].decisions.items():
        tap = block.taps[point]
        assert tap.spec.bits == 8 and tap.spec.grid == "symmetric"
        assert (tap.spec.dynamic == "token") == (decision["strategy"] == DYNAMIC)
    assert block.taps["k"].spec.dynamic == "token" and block.taps["q"].spec.bits == 16
    w = block.layer.fc1.weight
    for row in w[:8]:  # <= 16 levels per (row, group of 16)
        assert all(g.unique().numel() <= 16 for g in row.split(16))


# -- the reference's arithmetic, by hand --------------------------------------------------------------
def test_reference_grid_by_hand():
    # [min, max] = [-1, 2], 2 bits: scale = 3/4, zero = round(-(1)/(1.5)) = round(-0.667) = -1
    scale, zero = affine_params(torch.tensor(-1.0), torch.tensor(2.0), 2, "reference")
    assert scale.item() == 0.75 and zero.item() == -1.0
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    # codes clamp(round(x / 0.75) - 1, -2, 1) = [-2, -1, 0, 1] -> (q + 1) * 0.75: the top level is max - step
    assert fake_quant(x, scale, zero, 2, "reference").tolist() == [-0.75, 0.0, 0.75, 1.5]
    # a near-constant group must still round-trip (the reference's 1e-4 floor and 1e4 zero clamp do not)
    scale, zero = affine_params(torch.tensor(5.0), torch.tensor(5.0), 4, "reference")
    assert abs(fake_quant(torch.tensor(5.0), scale, zero, 4, "reference").item() - 5.0) < 1e-6
    # the reference code's clamps (reference_clamped): scale 1e-4, zero round(-5e4) cut to -1e4, so the code
    # clamp(5e4 - 1e4, -8, 7) = 7 dequantizes to (7 + 1e4) * 1e-4 = 1.0007, not 5
    scale, zero = affine_params(torch.tensor(5.0), torch.tensor(5.0), 4, "reference_clamped")
    assert scale.item() == pytest.approx(1e-4) and zero.item() == -1e4
    assert fake_quant(torch.tensor(5.0), scale, zero, 4, "reference_clamped").item() == pytest.approx(1.0007, abs=1e-6)


def test_ema_of_cluster_extreme_by_hand():
    obs = ChannelObserver()
    for sample in ([[1.0, 4.0]], [[3.0, 0.0]], [[2.0, 2.0]]):  # one token per sample, two channels
        obs(torch.tensor([sample]))
    gmin, gmax = obs.group_ranges("ema_minmax", (2,))
    # per-sample cluster max: 4, 3, 2 -> c = 4; 0.99*4 + 0.01*3 = 3.99; 0.99*3.99 + 0.01*2 = 3.9701
    assert gmax.item() == pytest.approx(3.9701)
    cmin, cmax = obs.group_ranges("ema_channel", (2,))
    # per channel: ch0 1 -> 1.02 -> 1.0298; ch1 4 -> 3.96 -> 3.9404; max = 3.9404 (narrower)
    assert cmax.item() == pytest.approx(3.9404)
    assert obs.group_ranges("minmax", (2,))[1].item() == 4.0


def test_per_sequence_dynamic_ranges_by_hand():
    x = torch.tensor([[[0.0, 10.0], [3.0, -10.0]], [[1.0, 1.0], [2.0, 2.0]]])  # 2 sequences, 2 tokens, 2 channels
    q = ActQuantizer(QuantSpec(bits=2, group_sizes=(1, 1), dynamic="sequence", grid="full"))
    out = q(x)
    # sequence 0, channel 0: range [0, 3], step 1 -> exact; channel 1: [-10, 10] step 20/3
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 3.0]))
    assert torch.allclose(out[1], x[1])  # sequence 1's own ranges fit its values exactly
    per_token = ActQuantizer(QuantSpec(bits=2, group_sizes=None, dynamic="token", grid="full"))(x)
    assert not torch.allclose(per_token, out)


def test_rptq_kmeans_sees_global_minmax_and_unscaled_q():
    """R2 features: q taken at q_proj's output (before 1/sqrt(d)); R1 features: global extremes."""
    from rptq.context import BlockContext
    from rptq.methods import rptq as rptq_method

    model = _opt()
    adapter = adapter_for(model.config)
    wrap_blocks(model, adapter)
    block = adapter.layers(model)[0]
    obs = {p: ChannelObserver() for p in ("qkv_in", "q", "k")}
    for p, o in obs.items():
        block.taps[p] = o
    ids = torch.randint(4, 1000, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)
    ctx = BlockContext(block, obs, QuantConfig(metric="ema_minmax"))
    got = rptq_method._feature_ranges(ctx, "qkv_in")
    want = obs["qkv_in"].channel_minmax()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    (qmin, qmax), (kmin, kmax) = rptq_method.qk_feature_ranges(ctx)
    tap_min, tap_max = obs["q"].channel_minmax()
    unscale = block.spec.heads.head_dim ** 0.5  # OPT's tap sees q_proj(h) / sqrt(head_dim)
    assert torch.allclose(qmin, tap_min * unscale) and torch.allclose(qmax, tap_max * unscale)
    assert torch.equal(kmax, obs["k"].channel_minmax()[1])


def test_gptqt_in_the_pipeline_binary_levels_and_lower_error_than_gptq():
    model = _opt()
    calib = torch.randint(4, 1000, (8, 64), generator=torch.Generator().manual_seed(3))
    ids = torch.randint(4, 1000, (4, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for wq in ("gptq", "gptqt", "bcq"):
        quant = copy.deepcopy(model)
        cfg = QuantConfig(wbits=3, abits=16, w_quantizer=wq, transforms=(), grid="full", w_range="minmax")
        quantize_model(quant, adapter_for(quant.config), calib, cfg, progress=False)
        with torch.no_grad():
            errs[wq] = float(((quant(ids).logits - ref) ** 2).mean())
        block = quant.model.decoder.layers[0]
        w = block.layer.fc1.weight
        if wq != "gptq":
            assert all(row.unique().numel() <= 8 for row in w)  # 2^3 binary-coded levels per row
            codes = block.weight_codes["fc1"]
            signs = codes["planes"].double() * 2 - 1  # (k, rows, cols)
            rebuilt = codes["offset"][:, :1] + (signs.permute(1, 2, 0) * codes["alpha"][:, :1, :]).sum(-1)
            assert torch.allclose(rebuilt.float(), w, atol=1e-6)
    assert errs["gptqt"] < errs["gptq"], errs
