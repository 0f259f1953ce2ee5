"""Half precision and devices (#20 item 10): every method preset calibrates and runs in bf16 and
fp16 (the GPU's dtype, here on the CPU) without losing accuracy to the dtype; a checkpoint saved
in one dtype loads entirely in the run's dtype (no fp16 blocks beside fp32 resident tensors);
layer_mse's quantizers are put on the block's device; the default --seqlen is capped at 2048."""
import copy
import json
from functools import lru_cache

import pytest
import torch

import main as cli
from rptq.flags import quant_config
from models.registry import adapter_for
from rptq import act_quantizers
from rptq.checkpoint import load_quantized, save_quantized
from rptq.pipeline import quantize_model
from rptq.run_config import RunConfig
from tests.helpers import gpt2_tokenizer, inject_opt_outliers, tiny_opt
from tests.test_llama import tiny_llama

CPU = torch.device("cpu")
SMALL = ["--R1_clusters", "4", "--R2_clusters", "2", "--R3_clusters", "2", "--R4_clusters", "4", "--R5_clusters", "4"]
PRESETS = {
    "rptq": ["--wbits", "4", "--abits", "4", *SMALL],
    "smoothquant": ["--method", "smoothquant"],
    "fptq": ["--method", "fptq"],
    "duquant": ["--method", "duquant", "--rotation_steps", "4", "--rotation_block", "16"],
    "rotation": ["--method", "rotation", "--rotation_block", "16"],
    "gptqt": ["--wbits", "3", "--w_quantizer", "gptqt", *SMALL],
}
HALF = (torch.bfloat16, torch.float16)
# A quantized model is not a smooth function of its inputs: one bf16 rounding moves an activation
# across a 4-bit step, so half-precision logits differ from fp32 ones by 5-70% relative on these
# tiny models (measured) -- the quantization's own size, not a dtype defect. What must hold is that
# the dtype costs no accuracy: the half-precision model's error against the unquantized fp32 model
# stays that of the fp32-calibrated one. Measured ratio 0.985-1.015 (OPT), 0.93-0.99 (Llama, GQA),
# torch 2.13 CPU; the bound leaves margin for other builds. A dtype defect (a scale rounded to fp16, a
# mixed-dtype matmul) shows as inf/NaN or a ratio far above.
ERROR_RATIO = 1.10


def _config(*argv):
    return quant_config(cli.build_parser().parse_args(["tiny", *argv]))


def _model(arch):
    if arch == "opt":
        return inject_opt_outliers(tiny_opt(seed=0, layers=1, vocab=1000), seed=1)
    return tiny_llama(seed=0)  # GQA (4 heads, 2 K/V heads), RoPE


def _ids(n=3, t=32):
    return torch.randint(4, 1000, (n, t), generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits


@lru_cache(maxsize=None)
def _fp32_reference(arch, preset):
    """(unquantized fp32 logits, fp32-calibrated logits, the fp32-calibrated model)."""
    base, ids = _model(arch), _ids()
    fp = _logits(base, ids)
    quant = copy.deepcopy(base)
    quantize_model(quant, adapter_for(base.config), ids, _config(*PRESETS[preset]), progress=False)
    return fp, _logits(quant, ids), quant


def _is_quantizer_state(name):
    """Quantizer ranges and online transforms: fp32 on every device, by design (ActQuantizer keeps its
    ranges in fp32 and returns the activation's dtype; rotations are built in float64, kept fp32)."""
    return ".taps." in name or ".online." in name


def _dtype_map(model):
    return {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}


def _assert_uniform(model, dtype):
    """Every float parameter and buffer in ``dtype``, except the quantizers' fp32 state."""
    wrong = {n: d for n, d in _dtype_map(model).items()
             if d != (torch.float32 if _is_quantizer_state(n) else dtype) and not n.endswith("inv_freq")}
    assert not wrong, wrong


def _cast_like_load(model, dtype):
    """The in-memory model with its float tensors in ``dtype``, the quantizers' state left fp32: what
    a checkpoint of it must load as."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if _is_quantizer_state(name + "."):
            continue
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.is_floating_point() and not key.endswith("inv_freq"):
                t.data = t.data.to(dtype)
    return model


CASES = [("opt", p) for p in PRESETS] + [("llama", "rptq"), ("llama", "duquant")]


@pytest.mark.parametrize("arch,preset", CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_calibrated_in_half_precision_is_finite_and_as_accurate(arch, preset):
    fp, q32, _ = _fp32_reference(arch, preset)
    err32 = _rel(q32, fp)
    for dtype in HALF:
        model, ids = _model(arch).to(dtype), _ids()
        quantize_model(model, adapter_for(model.config), ids, _config(*PRESETS[preset]), progress=False)
        _assert_uniform(model, dtype)
        logits = _logits(model, ids)
        assert logits.dtype == dtype and bool(torch.isfinite(logits).all()), dtype
        assert _rel(logits, fp) <= ERROR_RATIO * err32, (dtype, _rel(logits, fp), err32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return gpt2_tokenizer(tmp_path_factory.mktemp("tok"))


LOAD_CASES = [("opt", "rptq"), ("opt", "gptqt"), ("opt", "duquant"), ("llama", "rptq")]


@pytest.mark.parametrize("arch,preset", LOAD_CASES, ids=[f"{a}-{p}" for a, p in LOAD_CASES])
def test_checkpoint_saved_in_fp32_loads_entirely_in_bf16(arch, preset, tokenizer, tmp_path):
    """Packed weights are rebuilt in their saved dtype (bit for bit the calibrated weight) and cast
    once: the loaded model is the in-memory one cast, to the bit, with no fp32 block left over."""
    fp, q32, quant = _fp32_reference(arch, preset)
    adapter = adapter_for(quant.config)
    save_quantized(tmp_path / "q", quant, adapter, tokenizer, {"bit_manifest": {}})
    loaded = load_quantized(tmp_path / "q", CPU, torch.bfloat16)[0]
    _assert_uniform(loaded, torch.bfloat16)
    assert _dtype_map(loaded) == _dtype_map(_cast_like_load(quant, torch.bfloat16))
    logits = _logits(loaded, _ids())
    assert torch.equal(logits, _logits(_cast_like_load(quant, torch.bfloat16), _ids()))
    assert bool(torch.isfinite(logits).all()) and _rel(logits, fp) <= 1.5 * _rel(q32, fp)


def test_checkpoint_saved_in_fp16_loads_in_fp32_on_the_cpu(tokenizer, tmp_path):
    """The reported case: calibrated on a GPU (fp16), evaluated on the CPU (fp32). The blocks used to
    keep their saved fp16 beside fp32 resident tensors; a float linear (here: the weights left at 16
    bits) passes quant.json's check in the run's width."""
    for name, flags in (("rptq", PRESETS["rptq"]), ("a4", ["--wbits", "16", "--abits", "4", *SMALL])):
        model, ids = tiny_opt(seed=0, layers=1, vocab=1000).half(), _ids(2, 16)
        adapter = adapter_for(model.config)
        quantize_model(model, adapter, ids, _config(*flags), progress=False)
        save_quantized(tmp_path / name, model, adapter, tokenizer, {"bit_manifest": {}})
        loaded = load_quantized(tmp_path / name, CPU)[0]  # default: the CPU's fp32
        _assert_uniform(loaded, torch.float32)
        # fp16 -> fp32 is exact: the loaded weights are the calibrated ones.
        assert torch.equal(_logits(loaded, ids), _logits(_cast_like_load(model, torch.float32), ids))


def test_layer_mse_quantizers_are_moved_to_the_block_device(monkeypatch):
    """The observers keep ranges on the CPU; on a GPU a quantizer built from them and run in the
    block (layer_mse's candidates) is a device mismatch unless moved. On this CPU-only machine the
    move is seen by recording each quantizer's ``.to``: every static one, every candidate included,
    is sent to the block's device before it runs, and every tap buffer ends up there."""
    made = []

    class Recording(act_quantizers.ActQuantizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.moved_to = []
            made.append(self)

        def to(self, *args, **kwargs):
            self.moved_to.append(torch.device(args[0]) if args else kwargs.get("device"))
            return super().to(*args, **kwargs)

    monkeypatch.setattr(act_quantizers, "ActQuantizer", Recording)
    model, ids = tiny_opt(seed=0, layers=1, vocab=1000), _ids(2, 16)
    adapter = adapter_for(model.config)
    report = quantize_model(model, adapter, ids, _config(*PRESETS["rptq"], "--metric", "layer_mse"), progress=False)
    assert all("layer_mse_clip" in d["points"] for d in report.decisions())
    static = [q for q in made if q.spec.static]
    candidates = [q for q in static if q.spec.clip != 1.0]
    assert static and candidates  # the search ran and made candidates
    for quantizer in static:
        assert quantizer.moved_to and quantizer.moved_to[0] == CPU, quantizer.spec
    for block in adapter.layers(model):
        device = act_quantizers.block_device(block)
        assert all(b.device == device for b in block.taps.buffers())


def test_default_seqlen_is_capped_at_2048():
    assert RunConfig(model="m").seqlen_for(8192) == (2048, "seqlen 2048 (default: min(model max positions 8192, 2048))")
    assert RunConfig(model="m").seqlen_for(256)[0] == 256
    assert RunConfig(model="m", seqlen=3000).seqlen_for(4096) == (3000, "seqlen 3000 (--seqlen)")


def test_default_seqlen_run_on_a_4096_position_llama(tmp_path, capsys):
    """A run without --seqlen on a model with 4096 positions evaluates 2048-token windows, says so, and
    records the seqlen it used in results.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model_dir = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)
    gpt2_tokenizer(tmp_path / "tok").save_pretrained(str(model_dir))  # names its class: not Llama's
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(600)))
    code = cli.main([str(model_dir), "--wbits", "16", "--abits", "16", "--eval_ppl", "--ppl_datasets",
                     f"file:{text}", "--limit", "1", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu",
                     "--output_path", str(tmp_path / "out"), "--no_progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "seqlen 2048 (default: min(model max positions 4096, 2048))" in out.out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["seqlen"] == 2048
