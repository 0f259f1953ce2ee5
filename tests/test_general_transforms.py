"""General invertible transforms (quant.transforms.Kronecker, BlockLinear): exact in fp32 to 1e-4 with
quantization off at every linear input, across the heads and on Q/K, on tiny OPT and tiny Llama (GQA, RoPE,
biases, injected outliers); statistics re-expressed as a fresh pass measures them; rebuilt from their state."""
import copy

import pytest
import torch

from models.execution import wrap_blocks
from models.registry import adapter_for
from quant.rotation import random_orthogonal
from quant.transforms import BlockLinear, Kronecker, Scale, kronecker_apply, kronecker_sizes, transform_from_state
from rptq.fold import ONLINE, ROWS, place, place_qk, place_within_heads
from rptq.stats import ChannelObserver
from tests.test_transforms import MODELS, TOL, _ids, _logits, _rel


def _invertible(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random well-conditioned invertible matrix U diag(s) V^T (s in [0.5, 2]) and its inverse transpose,
    in float64 (as FlatQuant's factors are built)."""
    u, v = random_orthogonal(n, gen), random_orthogonal(n, gen)
    s = torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    return (u * s) @ v.T, (u / s) @ v.T


def _kronecker(channels: int, gen) -> Kronecker:
    a, b = kronecker_sizes(channels)
    (left, left_it), (right, right_it) = _invertible(a, gen), _invertible(b, gen)
    return Kronecker(left, right, left_it, right_it)


def test_kronecker_apply_is_the_kronecker_product():
    gen = torch.Generator().manual_seed(0)
    (left, _), (right, _) = _invertible(4, gen), _invertible(6, gen)
    x = torch.randn(5, 24, dtype=torch.float64, generator=gen)
    assert torch.allclose(kronecker_apply(x, left, right), x @ torch.kron(left, right), atol=1e-12)


@pytest.mark.parametrize("n,want", [(576, (24, 24)), (1536, (32, 48)), (64, (8, 8)), (128, (8, 16)),
                                    (2048, (32, 64)), (11008, (86, 128))])
def test_kronecker_sizes_are_flatquants(n, want):
    """a >= sqrt(n) with a^2 - n a square b^2: n = (a - b)(a + b) (the official get_decompose_dim)."""
    assert kronecker_sizes(n) == want and want[0] * want[1] == n


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_scale_and_kronecker_at_every_linear_input_are_exact(arch):
    model = MODELS[arch]
    ids = _ids(model)
    ref = _logits(model, ids)
    wrapped = copy.deepcopy(model)
    adapter = adapter_for(wrapped.config)
    wrap_blocks(wrapped, adapter)
    gen = torch.Generator().manual_seed(3)
    scales, kroneckers = [], []
    for block in adapter.layers(wrapped):
        for point in dict.fromkeys(block.spec.linear_inputs.values()):
            channels = block.module(block.spec.readers(point)[0]).in_features
            scales.append(place(block, point, Scale(torch.rand(channels, generator=gen) + 0.5)))
            kroneckers.append(place(block, point, _kronecker(channels, gen)))
    assert _rel(_logits(wrapped, ids), ref) < TOL
    assert set(kroneckers) == {ONLINE} and {"norm", ROWS} <= set(scales)  # scales fold into norms and rows


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_heads_and_query_key_transforms_are_exact(arch):
    """FlatQuant's attention transforms: Tv (a head_dim block) folded into the value rows and o_proj's columns
    (GQA: each query head uses its K/V head's block), To kron I online at o_proj's input, Tk^-T on Q and Tk on
    K online after RoPE."""
    model = MODELS[arch]
    ids = _ids(model, seed=1)
    ref = _logits(model, ids)
    wrapped = copy.deepcopy(model)
    adapter = adapter_for(wrapped.config)
    wrap_blocks(wrapped, adapter)
    gen = torch.Generator().manual_seed(5)
    for block in adapter.layers(wrapped):
        hd = block.spec.heads.head_dim
        edge = next(e for e in block.spec.linear_edges if e.per_head)
        tv, tv_it = _invertible(hd, gen)
        assert place_within_heads(block, edge.point, BlockLinear(tv, tv_it)) == ROWS
        heads = block.module(edge.consumer).in_features // hd
        to, to_it = _invertible(heads, gen)
        eye = torch.eye(hd, dtype=torch.float64)
        assert place(block, edge.point, Kronecker(to, eye, to_it, eye)) == ONLINE
        tk, tk_it = _invertible(hd, gen)
        assert place_qk(block, BlockLinear(tk_it, tk), BlockLinear(tk, tk_it)) == ONLINE
    assert _rel(_logits(wrapped, ids), ref) < TOL


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_statistics_follow_a_general_transform(arch):
    """After a scale and a Kronecker transform at the MLP's second input, the Hessian and the token sample the
    observer re-expressed equal what a fresh pass through the transformed block measures."""
    model = copy.deepcopy(MODELS[arch])
    adapter = adapter_for(model.config)
    wrap_blocks(model, adapter)
    block = adapter.layers(model)[0]
    spec = block.spec
    hidden = torch.randn(2, 16, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    kwargs = {}
    if spec.heads.rope:
        kwargs["position_embeddings"] = model.model.rotary_emb(hidden, torch.arange(16).unsqueeze(0))
    point = spec.linear_edges[-1].point
    channels = block.module(spec.readers(point)[0]).in_features

    @torch.no_grad()
    def observe():
        obs = ChannelObserver(hessian=True, sample_per_call=16, seed=1)
        block.taps[point] = obs
        block(hidden, **kwargs)
        block.taps[point] = torch.nn.Identity()
        return obs

    before = observe()
    gen = torch.Generator().manual_seed(9)
    for t in (Scale(torch.rand(channels, generator=gen) + 0.5), _kronecker(channels, gen)):
        place(block, point, t, {point: before})
    after = observe()
    scale = after.gptq.hessian.abs().max()
    assert float((before.gptq.hessian - after.gptq.hessian).abs().max() / scale) < 1e-4
    assert torch.allclose(before.sample(), after.sample(), rtol=1e-4, atol=1e-4)


def test_transforms_rebuild_from_their_state():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 48, generator=gen)
    tv, tv_it = _invertible(16, gen)
    for t in (_kronecker(48, gen), BlockLinear(tv, tv_it)):
        again = transform_from_state(t.kind, t.state())
        assert torch.equal(again.apply(x), t.apply(x))
        assert torch.equal(again.consumer(x), t.consumer(x))
