"""--gptq_order sequential (QuaRot's and SpinQuant's GPTQ; GPTQ's llama.py --true-sequential): each input's
readers are quantized in block order and the next input's Hessian is measured through them. Checked against a plain
reimplementation: the Hugging Face layer run with the already quantized q/k/v weights, o_proj's input captured by a
hook, and 2/N sum x x^T formed in float64."""
import copy

import pytest
import torch

import rptq.weights as weights
from models.registry import adapter_for
from rptq.config import QuantConfig
from rptq.pipeline import quantize_model
from tests.test_llama import tiny_llama

BASE = dict(method="quarot", transforms=(), abits_policy="quarot", grid="quarot", w_quantizer="gptq", wbits=4,
            abits=16, w_clip_fit="search", block_inputs="weights")


def _quantized(order: str, calib, capture=None):
    model = tiny_llama(seed=3)
    original = weights.remeasure_hessian

    def remeasure(ctx, point):  # the re-measured Hessian, as GPTQ receives it
        original(ctx, point)
        if capture is not None and ctx.layer == 0:
            capture[point] = ctx.observers[point].gptq.hessian.clone()

    weights.remeasure_hessian = remeasure
    try:
        quantize_model(model, adapter_for(model.config), calib, QuantConfig(**BASE, gptq_order=order), progress=False)
    finally:
        weights.remeasure_hessian = original
    return model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))


def test_sequential_remeasures_each_later_input_through_the_quantized_readers(calib):
    captured = {}
    seq = _quantized("sequential", calib, captured)
    together = _quantized("together", calib)
    layer_s, layer_t = seq.model.layers[0].layer, together.model.layers[0].layer  # inside the quantized blocks
    # the first input's readers see the FP pass's Hessian in both orders: bit-identical weights
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(layer_s.self_attn, name).weight, getattr(layer_t.self_attn, name).weight)
    # every later input is measured anew (three of them in a Llama block), and o_proj comes out different
    assert len(captured) == 3
    assert not torch.equal(layer_s.self_attn.o_proj.weight, layer_t.self_attn.o_proj.weight)

    # plain reimplementation of o_proj's re-measured Hessian: the FP layer with the quantized q/k/v weights
    fp = tiny_llama(seed=3)
    ref_layer = copy.deepcopy(fp.model.layers[0])
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(ref_layer.self_attn, name).weight.data = getattr(layer_s.self_attn, name).weight.data.clone()
    seen = []
    ref_layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        hidden = fp.model.embed_tokens(calib)
        positions = torch.arange(calib.shape[1]).unsqueeze(0)
        ref_layer(hidden, position_embeddings=fp.model.rotary_emb(hidden, positions), attention_mask=None,
                  position_ids=positions)
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    expected = 2 / x.shape[0] * x.t() @ x
    got = captured[list(captured)[0]].double()  # re-measured in block order: o_proj's input first
    assert got.shape == expected.shape
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


def test_sequential_order_is_deterministic(calib):
    a, b = _quantized("sequential", calib), _quantized("sequential", calib)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_act_order_reaches_every_sweep_and_keeps_the_group_grids(calib):
    """--act_order (QuantConfig.act_order) through the pipeline: the sequential sweeps take the other column order
    (other weights), deterministically, and every weight stays on its own group's grid (static groups: the act-order
    sweep must not move a column onto another group's scale)."""
    def run(act_order):
        model = tiny_llama(seed=3)
        cfg = QuantConfig(**{**BASE, "w_clip_fit": ""}, w_group_size=8, gptq_order="sequential", act_order=act_order)
        quantize_model(model, adapter_for(model.config), calib, cfg, progress=False)
        return model
    plain, ordered, again = run(False), run(True), run(True)
    fp = tiny_llama(seed=3)
    moved = 0
    for (name, p), q, r, w in zip(plain.named_parameters(), ordered.parameters(), again.parameters(),
                                  fp.parameters()):
        assert torch.equal(q, r), name
        if name.endswith("proj.weight"):
            p, q, w = p.detach(), q.detach(), w.detach()
            moved += int((p != q).sum())
            groups = w.reshape(w.shape[0], -1, 8)
            # QuaRot's grid: scale absmax / 7 of the FP group (0 at most in a constant group), codes -8 .. 7
            scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
            codes = q.reshape(groups.shape) / scale
            assert float((codes - codes.round()).abs().max()) < 1e-3, name
            assert float(codes.min()) >= -8 - 1e-3 and float(codes.max()) <= 7 + 1e-3, name
    assert moved > 100
