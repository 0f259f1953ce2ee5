"""RPTQ on OPT-architecture models built here (outliers injected function-preservingly)."""
import copy

import pytest
import torch

from models.registry import adapter_for
from rptq.config import QuantConfig
from rptq.methods import bit_manifest
from models.execution import wrap_blocks
from rptq.pipeline import quantize_model
from tests.helpers import inject_opt_outliers, rptq_config, tiny_opt

SMALL_CLUSTERS = {"R1": 4, "R2": 2, "R3": 2, "R4": 4, "R5": 4}


@pytest.fixture(scope="module")
def base():
    model = inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1)
    ids = torch.randint(0, 50000, (8, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


def calibrated(model, ids, **kw):
    model = copy.deepcopy(model)
    cfg = rptq_config(clusters=dict(SMALL_CLUSTERS), **kw)
    report = quantize_model(model, adapter_for(model.config), ids, cfg, progress=False)
    with torch.no_grad():
        return model, model(ids).logits, report


def test_outlier_injection_preserves_function():
    clean = tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128)
    ids = torch.randint(0, 50000, (2, 32))
    with torch.no_grad():
        a = clean(ids).logits
        b = inject_opt_outliers(copy.deepcopy(clean), seed=1)(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_owned_block_forward_matches_hf(base):
    model, ids, ref = base
    wrapped = copy.deepcopy(model)
    wrap_blocks(wrapped, adapter_for(wrapped.config))
    with torch.no_grad():
        assert torch.allclose(wrapped(ids).logits, ref, atol=1e-4)


def test_reorder_fusion_alone_is_exact(base):
    model, ids, ref = base
    quantized, logits, report = calibrated(model, ids, wbits=16, abits=16, reorder="12345")
    assert torch.allclose(logits, ref, atol=1e-4)
    block = quantized.model.decoder.layers[0]
    assert not torch.equal(block.gathers["qkv_in"], torch.arange(64))  # a real permutation happened
    assert set(report.layers[0].layouts) == {"qkv_in", "q", "k", "v", "out_in", "fc1_in", "fc2_in"}
    assert len(report.layers[0].layouts["qkv_in"]) == 4
    assert len(report.layers[0].layouts["q"]) == 4 * 2  # per head: 4 heads x 2 clusters


def _err(logits, ref):
    return ((logits - ref) ** 2).mean().item()


def test_reorder_cuts_w4a4_error_on_outliers(base):
    model, ids, ref = base
    _, with_reorder, _ = calibrated(model, ids, wbits=4, abits=4, reorder="12345")
    _, baseline, _ = calibrated(model, ids, wbits=4, abits=4, reorder="")
    assert _err(with_reorder, ref) < 0.5 * _err(baseline, ref)


def test_same_seed_identical_results(base):
    model, ids, _ = base
    _, a, _ = calibrated(model, ids, wbits=4, abits=4, seed=5)
    _, b, _ = calibrated(model, ids, wbits=4, abits=4, seed=5)
    assert torch.equal(a, b)


def test_gptq_and_rtn_change_weights_gptq_lower_layer_error(base):
    model, ids, ref = base
    fp_model, _, _ = calibrated(model, ids, wbits=16, abits=16)  # same layouts, unquantized weights
    fp_fc1 = fp_model.model.decoder.layers[0].layer.fc1.weight
    errs = {}
    for wq in ("gptq", "rtn"):
        quantized, logits, report = calibrated(model, ids, wbits=3, abits=16, w_quantizer=wq)
        fc1 = quantized.model.decoder.layers[0].layer.fc1.weight
        assert not torch.allclose(fc1, fp_fc1, atol=1e-3)
        groups = len(report.layers[0].layouts["fc1_in"])
        assert all(row.unique().numel() <= 8 * groups for row in fc1)  # 3-bit grid per (row, cluster)
        errs[wq] = _err(logits, ref)
    assert errs["gptq"] < errs["rtn"]


def test_only_quant_kv_quantizes_k_and_v_only(base):
    model, ids, _ = base
    quantized, _, _ = calibrated(model, ids, wbits=4, abits=4, only_quant_kv=True)
    taps = quantized.model.decoder.layers[1].taps
    enabled = {p for p, t in taps.items() if t.spec.enabled}
    assert enabled == {"k", "v"}
    assert taps["k"].spec.bits == 4 and taps["k"].spec.group_sizes is not None


def test_a_dynamic_runs_and_differs(base):
    model, ids, ref = base
    _, static, _ = calibrated(model, ids, wbits=16, abits=4)
    _, dynamic, _ = calibrated(model, ids, wbits=16, abits=4, a_dynamic=True)
    assert not torch.equal(static, dynamic) and _err(dynamic, ref) > 0


MANIFEST_ROWS = [  # (cli, weights, ln_out, q, k, v, p, out_in, fc2_in)
    (dict(wbits=16, abits=16), 16, 16, 16, 16, 16, 16, 16, 16),
    (dict(wbits=4, abits=16), 4, 16, 16, 16, 16, 16, 16, 16),
    (dict(wbits=4, abits=8), 4, 8, 8, 8, 8, 8, 8, 8),
    (dict(wbits=4, abits=4), 4, 8, 4, 4, 4, 8, 4, 4),
    (dict(wbits=4, abits=4, only_quant_kv=True), 4, 16, 16, 4, 4, 16, 16, 16),
    (dict(wbits=4, abits=3, only_quant_kv=True), 4, 16, 16, 3, 3, 16, 16, 16),
    (dict(wbits=3, abits=3, only_quant_kv=True), 3, 16, 16, 3, 3, 16, 16, 16),
    (dict(wbits=4, abits=4, abits_policy="uniform"), 4, 4, 4, 4, 4, 16, 4, 4),
]


@pytest.mark.parametrize("row", MANIFEST_ROWS)
def test_bit_manifest_rows(row):
    kw, w, ln, q, k, v, p, out_in, fc2_in = row
    spec = adapter_for(tiny_opt(layers=1).config).block_spec(tiny_opt(layers=1).config)
    m = bit_manifest(QuantConfig(**kw), spec)
    got = [m["weight:fc1"]["bits"], m["qkv_in"]["bits"], m["fc1_in"]["bits"], m["q"]["bits"], m["k"]["bits"],
           m["v"]["bits"], m["p"]["bits"], m["out_in"]["bits"], m["fc2_in"]["bits"]]
    assert got == [w, ln, ln, q, k, v, p, out_in, fc2_in]
    assert all(m[f"weight:{name}"]["bits"] == w for name in spec.linear_inputs)


def test_manifest_granularity_follows_reorder():
    config = tiny_opt(layers=1).config
    spec = adapter_for(config).block_spec(config)
    reordered = bit_manifest(QuantConfig(wbits=4, abits=4), spec)
    baseline = bit_manifest(rptq_config(wbits=4, abits=4, reorder=""), spec)
    assert reordered["qkv_in"]["granularity"].startswith("cluster(R1=32")
    assert reordered["weight:fc2"]["granularity"] == "row x cluster(R5)"
    assert baseline["qkv_in"]["granularity"] == "tensor" and baseline["weight:fc2"]["granularity"] == "row"


def test_one_cluster_per_point_equals_per_tensor(base):
    model, ids, _ = base
    one = {k: 1 for k in SMALL_CLUSTERS}
    a = copy.deepcopy(model)
    quantize_model(a, adapter_for(a.config), ids, rptq_config(wbits=16, abits=4, reorder="145", clusters=one),
                   progress=False)
    b = copy.deepcopy(model)
    quantize_model(b, adapter_for(b.config), ids, rptq_config(wbits=16, abits=4, reorder="", clusters=one),
                   progress=False)
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)


def test_generation_is_refused_not_silently_wrong(base):
    model, ids, _ = base
    wrapped = copy.deepcopy(model)
    wrap_blocks(wrapped, adapter_for(wrapped.config))
    with pytest.raises(NotImplementedError, match="generate"):
        wrapped.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_its_dtype(dtype):
    """GPU runs are fp16: quantizers compute ranges in fp32 but hand back the activation dtype."""
    model = tiny_opt(seed=0, hidden=64, layers=1, heads=4, ffn=128).to(dtype)
    ids = torch.randint(4, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    for kw in (dict(), dict(a_dynamic=True)):
        m = copy.deepcopy(model)
        quantize_model(m, adapter_for(m.config), ids, rptq_config(wbits=4, abits=4, clusters=dict(SMALL_CLUSTERS), **kw),
                       progress=False)
        with torch.no_grad():
            logits = m(ids).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        assert m.model.decoder.layers[0].layer.fc1.weight.dtype == dtype
