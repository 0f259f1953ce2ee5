"""QuaRot's rotations leave the FP model unchanged: Hadamard constructions are orthogonal, R1 on
the residual stream alone and with R2 + R3 + R4 is exact in FP32 (tiny OPT with LayerNorm and learned
positions, tiny Llama with GQA, RoPE, biases and tied embeddings), and R1 composes with RPTQ's
reorder and DuQuant's rotations."""
import copy

import pytest
import torch

from models.norms import RMSNorm
from models.registry import adapter_for
from quant.hadamard import hadamard, orthogonal_mixer, paley_i, paley_ii
from rptq.config import QuantConfig
from rptq.methods.duquant import RotationSettings
from rptq.methods.rptq import RPTQSettings
from rptq.methods.smoothquant import SmoothSettings
from rptq.pipeline import quantize_model
from rptq.residual_rotate import rotate_residual
from tests.helpers import inject_opt_outliers, tiny_opt
from tests.test_llama import inject_outliers, tiny_llama

TOL = 1e-4


def _tied_llama():
    model = inject_outliers(tiny_llama(seed=1))
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


MODELS = {"opt": inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1),
          "llama": inject_outliers(tiny_llama(bias=True)), "llama_tied": _tied_llama()}


def _ids(n=3, t=24, seed=0):
    return torch.randint(4, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("n", [12, 20, 36, 64, 576, 28, 96, 1536])
def test_hadamard_constructions_are_orthogonal(n):
    h, m = hadamard(n)
    assert h.dtype == torch.float64
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.allclose((h * n ** 0.5).abs(), torch.ones(n, n, dtype=torch.float64), atol=1e-12)  # entries +-1
    assert n % m == 0 and (n // m) & (n // m - 1) == 0


def test_paley_orders_and_refusals():
    assert paley_i(11).shape == (12, 12) and paley_i(59).shape == (60, 60) and paley_ii(17).shape == (36, 36)
    for q in (59, 19):
        h = paley_i(q)
        assert torch.equal(h @ h.T, (q + 1) * torch.eye(q + 1, dtype=torch.float64))
    h = paley_ii(17)
    assert torch.equal(h @ h.T, 36 * torch.eye(36, dtype=torch.float64))
    with pytest.raises(ValueError):
        paley_i(13)  # 13 = 1 mod 4
    with pytest.raises(ValueError):
        paley_ii(15)  # not prime


def test_no_construction_falls_back_to_random_orthogonal_and_says_so():
    assert hadamard(52) is None  # 52 = 4 * 13 needs q = 51 or 25: not primes
    q, kind = orthogonal_mixer(52, torch.Generator().manual_seed(0))
    assert kind == "random"
    assert torch.allclose(q @ q.T, torch.eye(52, dtype=torch.float64), atol=1e-10)
    q, kind = orthogonal_mixer(576, torch.Generator().manual_seed(0))
    assert kind == "randomized hadamard(36*16)"
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_residual_rotation_alone_is_exact(arch, kind):
    model = MODELS[arch]
    ids = _ids()
    ref = _logits(model, ids)
    rotated = copy.deepcopy(model)
    info = rotate_residual(rotated, adapter_for(rotated.config), kind, seed=2)
    assert _rel(_logits(rotated, ids), ref) < TOL
    assert info["kind"] == ("randomized hadamard(64)" if kind == "hadamard" else "random")
    if arch == "opt":  # LayerNorms became RMSNorms on a zero-mean residual; the final shift a head bias
        assert info["centred"] and info["head_untied"] and info["head_bias_added"]
        assert isinstance(rotated.model.decoder.final_layer_norm, RMSNorm)
        assert isinstance(rotated.model.decoder.layers[0].self_attn_layer_norm, RMSNorm)
    if arch == "llama_tied":  # the head absorbs the final norm's gain, the embeddings do not
        assert info["head_untied"] and rotated.lm_head.weight is not rotated.model.embed_tokens.weight
        assert rotated.config.tie_word_embeddings is False
    # The residual really changed basis: the embeddings are no longer the original ones.
    emb = adapter_for(model.config).residual_spec(model.config).embeddings[0]
    assert not torch.allclose(rotated.get_submodule(emb).weight, model.get_submodule(emb).weight, atol=1e-3)


def test_residual_rotation_spreads_outliers():
    """The injected outlier channels of the norm outputs are gone after R1 (the point of the rotation)."""
    model = MODELS["opt"]
    captured = {}

    def grab(name):
        return lambda mod, inp, out: captured.__setitem__(name, inp[0].detach())

    ids = _ids(seed=3)
    for tag, m in (("before", model), ("after", copy.deepcopy(model))):
        if tag == "after":
            rotate_residual(m, adapter_for(m.config), "hadamard", seed=2)
        handle = m.model.decoder.layers[1].self_attn.q_proj.register_forward_hook(grab(tag))
        _logits(m, ids)
        handle.remove()
    ratio = {k: float(v.abs().amax((0, 1)).max() / v.abs().amax((0, 1)).mean()) for k, v in captured.items()}
    assert ratio["after"] < ratio["before"] / 3


QUAROT = dict(method="quarot", transforms=("residual_rotate", "head_rotate", "qk_rotate", "mlp_rotate"),
              abits_policy="quarot", grid="symmetric")
SMALL = (RPTQSettings(R1_clusters=4, R2_clusters=2, R3_clusters=2, R4_clusters=4, R5_clusters=4),
         RotationSettings(block_size=16, steps=32, sample_tokens=64))
COMPOSED = {
    "quarot": (QUAROT, ()),
    "R1+reorder": (dict(transforms=("residual_rotate", "reorder")), ()),
    "R1+duquant": (dict(method="duquant", transforms=("residual_rotate", "smooth", "rotate", "qk_rotate"),
                        abits_policy="duquant"), (SmoothSettings(alpha=0.6, points="all", floor=1e-2),)),
}


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("name", list(COMPOSED))
def test_rotations_and_compositions_are_exact_with_quantization_off(arch, name):
    """R1 + R2 + R3 + R4 (the quarot preset), R1 + RPTQ's clusters, R1 + DuQuant: FP unchanged."""
    model = MODELS[arch]
    ids = _ids(seed=2)
    ref = _logits(model, ids)
    quant = copy.deepcopy(model)
    shared, settings = COMPOSED[name]
    cfg = QuantConfig(wbits=16, abits=16, **shared).using(*SMALL, *settings)
    report = quantize_model(quant, adapter_for(quant.config), _ids(n=4, seed=5), cfg, progress=False)
    assert _rel(_logits(quant, ids), ref) < TOL
    assert report.summary()["residual_rotation"]["kind"].startswith("randomized hadamard")
    steps = {(p["step"], p["where"]) for p in report.layers[0].placements}
    if name == "quarot":  # R2 folded into v rows / o columns (GQA on llama), its across-heads part, R3, R4 online
        assert steps == {("head_rotate", "rows"), ("head_rotate", "online"), ("qk_rotate", "online"),
                         ("mlp_rotate", "online")}
    assert all(e["block_rel_mse"] < 1e-8 for e in report.layer_errors())
