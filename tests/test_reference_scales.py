"""SmoothQuant's and FPTQ's channel scales against the formulas evaluated by hand.

- rptq.methods.smoothquant.smoothing_scale: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), both maxima
  clamped at 1e-5 first, the result floored at ``floor``;
- rptq.methods.fptq.lae_scale: s_j = m_j / log2(2 + m_j), floored at 1e-5;

first on small tensors whose answers are worked out in the comments (to 1e-6), then through the
pipeline on a tiny OPT: the scales it folded into layer 0's LayerNorms (weight / s) and readers'
columns (W * s) must equal the formula applied to max|X_j| of the LayerNorm outputs, captured here
with a forward hook on the unmodified Hugging Face layer, and to max_j over q/k/v (or fc1) rows of
|W_ij| (to 1e-4 relative: the pipeline's FP pass runs one window at a time, the hook a batch,
so the captured maxima can differ in their last bits).
"""
import copy
import math

import numpy as np
import pytest
import torch

from models.registry import adapter_for
from rptq.config import QuantConfig
from rptq.methods.fptq import FPTQSettings, lae_scale
from rptq.methods.smoothquant import SmoothSettings, smoothing_scale
from rptq.pipeline import quantize_model
from tests.helpers import inject_opt_outliers, tiny_opt


def test_smoothing_scale_by_hand_alpha_half():
    # s = sqrt(a) / sqrt(w):  sqrt(4)/sqrt(1) = 2,  sqrt(9)/sqrt(4) = 1.5,  sqrt(0.25)/sqrt(16) = 0.125
    #                         sqrt(16)/sqrt(4) = 2, sqrt(1)/sqrt(1) = 1,   sqrt(100)/sqrt(0.01) = 100
    a = torch.tensor([[4.0, 9.0, 0.25], [16.0, 1.0, 100.0]])
    w = torch.tensor([[1.0, 4.0, 16.0], [4.0, 1.0, 0.01]])
    s = smoothing_scale(a, w, alpha=0.5)
    np.testing.assert_allclose(s.numpy(), [[2.0, 1.5, 0.125], [2.0, 1.0, 100.0]], rtol=1e-6)


def test_smoothing_scale_by_hand_other_alphas():
    # alpha 0.75: a^0.75 / w^0.25: 16 -> 8 / 16^0.25 = 8 / 2 = 4;  81 -> 27 / 1 = 27;  1 / 81^0.25 = 1/3
    s = smoothing_scale(torch.tensor([16.0, 81.0, 1.0]), torch.tensor([16.0, 1.0, 81.0]), alpha=0.75)
    np.testing.assert_allclose(s.numpy(), [4.0, 27.0, 1 / 3], rtol=1e-6)
    # alpha 1: s = a (the weights' maxima do not count); alpha 0: s = 1 / w
    np.testing.assert_allclose(smoothing_scale(torch.tensor([3.0, 0.5]), torch.tensor([7.0, 2.0]), 1.0).numpy(),
                               [3.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(smoothing_scale(torch.tensor([3.0, 0.5]), torch.tensor([8.0, 0.5]), 0.0).numpy(),
                               [0.125, 2.0], rtol=1e-6)


def test_smoothing_scale_clamps_and_floor_by_hand():
    # a dead activation channel: a clamped to 1e-5, s = sqrt(1e-5) / sqrt(1) = 0.00316227766...
    # a dead weight column: w clamped to 1e-5, s = sqrt(1) / sqrt(1e-5) = 316.227766...
    s = smoothing_scale(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), alpha=0.5)
    np.testing.assert_allclose(s.numpy(), [0.0031622776601683794, 316.22776601683796], rtol=1e-6)
    # with DuQuant's floor 1e-2 the dead activation channel's 0.00316 becomes 0.01; 2 / 1 = 2 stays
    s = smoothing_scale(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0]), alpha=0.5, floor=1e-2)
    np.testing.assert_allclose(s.numpy(), [0.01, 2.0], rtol=1e-6)


def test_lae_scale_by_hand():
    # s = m / log2(2 + m): 2 / log2(4) = 1, 6 / log2(8) = 2, 14 / log2(16) = 3.5, 30 / log2(32) = 6,
    #                      62 / log2(64) = 62 / 6 = 10.333..., 0 -> 0 / 1 = 0 -> floor 1e-5
    m = torch.tensor([[2.0, 6.0, 14.0], [30.0, 62.0, 0.0]])
    np.testing.assert_allclose(lae_scale(m).numpy(), [[1.0, 2.0, 3.5], [6.0, 62 / 6, 1e-5]], rtol=1e-6)
    # 1e-9 / log2(2 + 1e-9) = ~1e-9: floored too
    assert lae_scale(torch.tensor([1e-9])).item() == pytest.approx(1e-5, rel=1e-6)


# -- the same formulas, through the pipeline ---------------------------------------------------------
def _model_and_ids():
    model = inject_opt_outliers(tiny_opt(seed=0, hidden=32, layers=1, heads=2, ffn=64, vocab=1000), seed=1)
    ids = torch.randint(4, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, ids


def _norm_outputs(model, ids):
    """max |X_j| of layer 0's two LayerNorm outputs over every calibration token (plain hooks)."""
    layer = model.model.decoder.layers[0]
    seen = {}
    hooks = [norm.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.detach()))
             for name, norm in (("qkv_in", layer.self_attn_layer_norm), ("fc1_in", layer.final_layer_norm))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    # (Hugging Face's OPT layer flattens the tokens to (B*T, D) before final_layer_norm.)
    return {name: out.reshape(-1, out.shape[-1]).double().abs().amax(0).numpy() for name, out in seen.items()}


def _folded_scales(before, after):
    """s implied by what was folded: LayerNorm weight / s, and readers' columns * s."""
    b, a = before.model.decoder.layers[0], after.model.decoder.layers[0].layer
    out = {}
    for point, norm, readers in (("qkv_in", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj")),
                                 ("fc1_in", "final_layer_norm", ("fc1",))):
        norm_s = (b.get_submodule(norm).weight.detach().double() / a.get_submodule(norm).weight.detach().double()).numpy()
        column_s = [(a.get_submodule(r).weight.detach().double() / b.get_submodule(r).weight.detach().double()).numpy()
                    for r in readers]
        out[point] = (norm_s, column_s)
    return out


def _weight_absmax(model, readers):
    layer = model.model.decoder.layers[0]
    return np.max([layer.get_submodule(r).weight.detach().double().abs().amax(0).numpy() for r in readers], axis=0)


@pytest.mark.parametrize("alpha,weights", [(0.5, "readers"), (0.8, "readers"), (0.6, "lead")])
def test_smoothquant_pipeline_folds_the_formula(alpha, weights):
    """weights "readers": max over q/k/v (SmoothQuant); "lead": q_proj's alone (DuQuant's released code)."""
    model, ids = _model_and_ids()
    act = _norm_outputs(model, ids)
    cfg = QuantConfig(method="smoothquant", transforms=("smooth",), abits_policy="smoothquant", grid="symmetric",
                      w_quantizer="rtn", wbits=16, abits=16).using(SmoothSettings(alpha=alpha, points="norm",
                                                                                    weights=weights))
    quant = copy.deepcopy(model)
    quantize_model(quant, adapter_for(quant.config), ids, cfg, progress=False)
    folded = _folded_scales(model, quant)
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if weights == "readers" else ("self_attn.q_proj",)
    for point, readers in (("qkv_in", qkv), ("fc1_in", ("fc1",))):
        a = np.maximum(act[point], 1e-5)
        w = np.maximum(_weight_absmax(model, readers), 1e-5)
        expected = np.maximum(a**alpha / w ** (1 - alpha), 1e-5)
        norm_s, column_s = folded[point]
        assert expected.max() / expected.min() > 2  # the outlier channels got their own scales
        np.testing.assert_allclose(norm_s, expected, rtol=1e-4)
        for s in column_s:  # every weight of every reader's column j multiplied by s_j
            np.testing.assert_allclose(s, np.broadcast_to(expected, s.shape), rtol=1e-4)


def test_fptq_lae_pipeline_folds_the_formula():
    model, ids = _model_and_ids()
    act = _norm_outputs(model, ids)
    cfg = QuantConfig(method="fptq", transforms=("lae",), abits_policy="fptq", wbits=16, abits=16).using(
        FPTQSettings(v0=0.0, v1=1e9))  # every norm-fed point takes LAE
    quant = copy.deepcopy(model)
    quantize_model(quant, adapter_for(quant.config), ids, cfg, progress=False)
    folded = _folded_scales(model, quant)
    for point in ("qkv_in", "fc1_in"):
        m = act[point]
        expected = np.array([max(mj / math.log2(2 + mj), 1e-5) for mj in m])
        norm_s, column_s = folded[point]
        assert expected.max() / expected.min() > 2
        np.testing.assert_allclose(norm_s, expected, rtol=1e-4)
        for s in column_s:
            np.testing.assert_allclose(s, np.broadcast_to(expected, s.shape), rtol=1e-4)


def test_lead_readers_are_the_query_and_up_projections():
    """The reader DuQuant's released smoothing reads per shared input: q_proj for Q/K/V; up (not gate) on Llama."""
    from transformers import LlamaConfig

    from models.llama import llama_block_spec
    from models.opt import opt_block_spec

    llama = llama_block_spec(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert llama.lead_reader("qkv_in") == "self_attn.q_proj" and llama.lead_reader("gate_up_in") == "mlp.up_proj"
    opt = opt_block_spec(tiny_opt().config)
    assert opt.lead_reader("qkv_in") == "self_attn.q_proj" and opt.lead_reader("fc1_in") == "fc1"
