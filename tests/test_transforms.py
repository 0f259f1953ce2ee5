"""The channel-transform mechanism: every transform alone and composed leaves the FP block
unchanged (tiny OPT and tiny Llama with GQA and RoPE, outliers injected), statistics are
re-expressed exactly, and each method's preset is exact with quantization off."""
import copy

import pytest
import torch

from models.registry import adapter_for
from quant.rotation import random_orthogonal, sylvester_hadamard
from rptq.config import QuantConfig
from rptq.methods.duquant import RotationSettings
from rptq.methods.fptq import FPTQSettings
from rptq.methods.rptq import RPTQSettings
from rptq.methods.smoothquant import SmoothSettings
from rptq.fold import ONLINE, NORM, ROWS, place, place_qk
from models.execution import wrap_blocks
from rptq.pipeline import quantize_model
from rptq.stats import ChannelObserver
from quant.transforms import BlockRotation, Permutation, Scale
from tests.helpers import inject_opt_outliers, tiny_opt
from tests.test_llama import inject_outliers, tiny_llama

TOL = 1e-4


def _models():
    return {"opt": inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1),
            "llama": inject_outliers(tiny_llama(bias=True))}


MODELS = _models()


def _ids(model, n=3, t=24, seed=0):
    return torch.randint(4, min(model.config.vocab_size, 1000), (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _transform(kind: str, channels: int, gen: torch.Generator):
    if kind == "scale":
        return Scale(torch.rand(channels, generator=gen) * 4 + 0.05)
    if kind == "permutation":
        return Permutation(torch.randperm(channels, generator=gen))
    block = 32 if channels % 32 == 0 else 16
    return BlockRotation(random_orthogonal(block, gen))


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("kinds", [("scale",), ("permutation",), ("rotation",), ("scale", "permutation", "rotation"),
                                   ("rotation", "permutation", "rotation"), ("scale", "rotation", "scale")])
def test_every_transform_at_every_linear_input_is_exact(arch, kinds):
    model = MODELS[arch]
    ids = _ids(model)
    ref = _logits(model, ids)
    wrapped = copy.deepcopy(model)
    adapter = adapter_for(wrapped.config)
    wrap_blocks(wrapped, adapter)
    gen = torch.Generator().manual_seed(7)
    where = set()
    for block in adapter.layers(wrapped):
        for point in dict.fromkeys(block.spec.linear_inputs.values()):
            channels = block.module(block.spec.readers(point)[0]).in_features
            for kind in kinds:
                where.add(place(block, point, _transform(kind, channels, gen)))
    assert _rel(_logits(wrapped, ids), ref) < TOL
    if "rotation" in kinds:
        assert ONLINE in where
    if kinds[0] in ("scale", "permutation"):
        assert {NORM, ROWS} <= where  # norms and producer rows both took a fold


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_query_key_rotation_and_permutation_are_exact(arch):
    model = MODELS[arch]
    ids = _ids(model, seed=1)
    ref = _logits(model, ids)
    wrapped = copy.deepcopy(model)
    adapter = adapter_for(wrapped.config)
    wrap_blocks(wrapped, adapter)
    for block in adapter.layers(wrapped):
        H = sylvester_hadamard(block.spec.heads.head_dim)
        assert place_qk(block, BlockRotation(H), BlockRotation(H)) == ONLINE
    assert _rel(_logits(wrapped, ids), ref) < TOL


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_statistics_are_re_expressed_not_re_measured(arch):
    """Ranges and the GPTQ Hessian after a transform equal what a fresh pass would measure."""
    model = copy.deepcopy(MODELS[arch])
    adapter = adapter_for(model.config)
    wrap_blocks(model, adapter)
    block = adapter.layers(model)[0]
    spec = block.spec
    hidden = torch.randn(2, 16, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    kwargs = {}
    if spec.heads.rope:
        kwargs["position_embeddings"] = model.model.rotary_emb(hidden, torch.arange(16).unsqueeze(0))
    point = spec.linear_edges[-1].point  # the MLP's second linear input (after ReLU / SwiGLU)
    channels = block.module(spec.readers(point)[0]).in_features

    def observe():
        obs = ChannelObserver(hessian=True, sample_per_call=16)
        block.taps[point] = obs
        block(hidden, **kwargs)
        block.taps[point] = torch.nn.Identity()
        return obs

    before = observe()
    gen = torch.Generator().manual_seed(4)
    for t in (Scale(torch.rand(channels, generator=gen) + 0.5), Permutation(torch.randperm(channels, generator=gen))):
        place(block, point, t, {point: before})
    after = observe()
    for got, want in zip(before.channel_minmax(), after.channel_minmax()):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(before.gptq.hessian, after.gptq.hessian, rtol=1e-4, atol=1e-5)
    assert torch.allclose(before.sample(), after.sample(), rtol=1e-4, atol=1e-5)


FP_PRESETS = {  # (shared settings, method settings); fptq routes everything through LAE so the fold is exercised
    "smoothquant": (dict(method="smoothquant", transforms=("smooth",), abits_policy="smoothquant"), ()),
    "fptq": (dict(method="fptq", transforms=("lae",), abits_policy="fptq"), (FPTQSettings(v0=0.0, v1=1e9),)),
    "duquant": (dict(method="duquant", transforms=("smooth", "rotate", "qk_rotate"), abits_policy="duquant",
                     act_clip=0.9), (SmoothSettings(alpha=0.6, points="all", floor=1e-2),
                                     RotationSettings(block_size=16, steps=32, sample_tokens=64))),
    "rotation": (dict(method="rotation", transforms=("rotate", "qk_rotate"), abits_policy="duquant", act_clip=0.9),
                 (RotationSettings(kind="hadamard", block_size=16),)),
    "smooth+reorder": (dict(transforms=("smooth", "reorder")),
                       (RPTQSettings(R1_clusters=4, R2_clusters=2, R3_clusters=2, R4_clusters=4, R5_clusters=4),)),
}


def fp_preset(name: str, **shared) -> QuantConfig:
    settings, methods = FP_PRESETS[name]
    return QuantConfig(**{**settings, **shared}).using(*methods)


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("preset", list(FP_PRESETS))
def test_method_transforms_alone_keep_the_model(arch, preset):
    """With quantization off, a method's transforms change no output (to 1e-4)."""
    model = MODELS[arch]
    ids = _ids(model, seed=2)
    ref = _logits(model, ids)
    quant = copy.deepcopy(model)
    cfg = fp_preset(preset, wbits=16, abits=16)
    report = quantize_model(quant, adapter_for(quant.config), _ids(model, n=4, seed=5), cfg, progress=False)
    assert _rel(_logits(quant, ids), ref) < TOL
    assert report.layers[0].placements, "no transform was placed"
    assert all(e["block_rel_mse"] < 1e-8 for e in report.layer_errors())


def test_duquant_same_seed_identical_rotations_and_results():
    model = MODELS["llama"]
    calib, ids = _ids(model, n=4, seed=6), _ids(model, seed=7)
    outs = []
    for _ in range(2):
        quant = copy.deepcopy(model)
        cfg = fp_preset("duquant", wbits=4, abits=4)
        quantize_model(quant, adapter_for(quant.config), calib, cfg, progress=False)
        outs.append((_logits(quant, ids), quant.model.layers[0].online["qkv_in"].steps[0].R.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_block_rotation_hessian_is_blockwise_exact_and_thread_invariant():
    """#21: B^T H B by two contiguous block-wise products. It is the dense product up to rounding,
    the same bits on one thread as on two, and the bits of the former strided form on one thread
    (so runs whose old result did not depend on the thread count keep their numbers)."""
    from quant.rotation import apply_block_rotation, block_diag_matrix
    from quant.threads import single_thread_on_cpu

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 768, generator=gen)
    H = x.t() @ x / x.shape[0]
    R = random_orthogonal(128, gen)
    t = BlockRotation(R)
    B = block_diag_matrix(R, 6)
    dense = (B.t() @ H.double() @ B).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = t.hessian(H.clone())
    finally:
        torch.set_num_threads(threads)
    with single_thread_on_cpu(H.device):
        one = t.hessian(H.clone())
        strided = apply_block_rotation(apply_block_rotation(H, t.R).t(), t.R).t()
    assert torch.allclose(two, dense, rtol=1e-4, atol=1e-5)
    assert torch.equal(one, two)
    assert torch.equal(one, strided)
