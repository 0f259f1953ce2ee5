"""--export compressed-tensors DIR: tiny OPT and Llama runs exported, reloaded by transformers
(compressed-tensors decompressing on CPU) and compared with this toolkit's fake-quantized model;
what the format cannot hold is refused with one line, exit code 2 and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import main as cli
from common.errors import UserError
from rptq.checkpoint import load_quantized
from rptq.export_plan import _signed_zero
from tests.helpers import gpt2_tokenizer, save_tiny_opt_dir

RUN = ["--nsamples", "2", "--seqlen", "64", "--calib_dataset", "ptb", "--no_progress"]
W4A16_G32 = ["--wbits", "4", "--abits", "16", "--w_group_size", "32", "--reorder", "235",
             "--R2_clusters", "2", "--R3_clusters", "2", "--R5_clusters", "4"]
W8A8_TOKEN = ["--method", "smoothquant", "--a_dynamic"]
TOL = 1e-4


def _tiny_llama_dir(dest: Path) -> Path:
    """A Llama-architecture directory (GQA, RoPE) with the GPT-2 tokenizer, vocab large enough for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-trivial norm weights (HF initialises them to 1)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(dest))
    gpt2_tokenizer(dest.parent / "tok").save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_models")
    return {"opt": save_tiny_opt_dir(root / "opt", seed=0, layers=2), "llama": _tiny_llama_dir(root / "llama")}


def _export(models, tmp_path, arch: str, flags: list[str]) -> tuple[Path, Path, dict]:
    """Calibrate, save our checkpoint and export in one run; (ours, export, results.json)."""
    ours, export, out = tmp_path / "q", tmp_path / "ct", tmp_path / "out"
    assert cli.main([str(models[arch]), *flags, *RUN, "--cache_dir", str(tmp_path.parent / "cache"),
                     "--save_quantized", str(ours), "--export", "compressed-tensors", str(export),
                     "--output_path", str(out)]) == 0
    return ours, export, json.loads((out / "results.json").read_text())


def _ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _ours(path: Path):
    model, _, adapter, _ = load_quantized(path, torch.device("cpu"))
    return model, adapter


def _quantization_config(export: Path) -> dict:
    return json.loads((export / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_w4a16_gptq_g32_reloads_with_our_logits(models, tmp_path, arch):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ours_dir, export, results = _export(models, tmp_path, arch, W4A16_G32)
    qc = _quantization_config(export)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (scheme,) = qc["config_groups"].values()
    assert scheme["weights"]["num_bits"] == 4 and scheme["weights"]["group_size"] == 32
    assert scheme["weights"]["symmetric"] is False and scheme["input_activations"] is None
    assert len(scheme["targets"]) == 2 * (6 if arch == "opt" else 7)
    record = results["export"]
    assert record["dir"] == str(export) and record["compression_format"] == "pack-quantized"
    assert record["linears"] == len(scheme["targets"]) and record["not_in_format"] == {}
    # Asymmetric packed zero points: transformers 5.23 prepares the model with unpacked ones (the note says so).
    assert any("dequantize=True" in note for note in record["notes"])
    theirs = AutoModelForCausalLM.from_pretrained(str(export),
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    ours, _ = _ours(ours_dir)
    with torch.no_grad():
        assert _rel(ours(_ids()).logits, theirs(_ids()).logits) <= TOL


def _linear_input_only(model, adapter) -> None:
    """Our model with only the quantizers the format holds: the linears' inputs (Q/K/V stay FP)."""
    for block in adapter.layers(model):
        inputs = set(block.spec.linear_inputs.values())
        for point in list(block.taps):
            if point not in inputs:
                block.taps[point] = nn.Identity()


def _no_activation_quant(model, adapter, theirs) -> None:
    for block in adapter.layers(model):
        for point in list(block.taps):
            block.taps[point] = nn.Identity()
    for module in theirs.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False


def _assert_matches_with_and_without_activation_quant(ours, adapter, theirs) -> None:
    """Without activation quantization on either side the logits agree to TOL (the weights are exact);
    with it, they differ by less than twice what activation quantization itself changes."""
    with torch.no_grad():
        with_act, theirs_act = ours(_ids()).logits, theirs(_ids()).logits
        _no_activation_quant(ours, adapter, theirs)
        no_act, theirs_no_act = ours(_ids()).logits, theirs(_ids()).logits
    assert _rel(no_act, theirs_no_act) <= TOL
    assert _rel(with_act, theirs_act) < 2 * _rel(with_act, no_act)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_w8a8_smoothquant_per_token_reloads(models, tmp_path, arch):
    """transformers' default load keeps compressed-tensors' quantized forward: each linear's input is
    fake-quantized per token on the format's grid (max|x| / 127.5), ours on max|x| / 127. Weights are exact
    (activation quantization off on both sides: 1e-4); with it on, every activation is within one step of
    ours and the logits differ by less than twice what activation quantization itself changes."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from transformers import AutoModelForCausalLM

    ours_dir, export, results = _export(models, tmp_path, arch, W8A8_TOKEN)
    qc = _quantization_config(export)
    assert qc["format"] == "int-quantized"
    (scheme,) = qc["config_groups"].values()
    assert scheme["weights"]["num_bits"] == 8 and scheme["weights"]["symmetric"] is True
    assert scheme["input_activations"]["dynamic"] is True and scheme["input_activations"]["strategy"] == "token"
    assert results["export"]["not_in_format"] == {"q": "8-bit", "k": "8-bit", "v": "8-bit"}
    theirs = AutoModelForCausalLM.from_pretrained(str(export))
    ours, adapter = _ours(ours_dir)
    _linear_input_only(ours, adapter)
    block = adapter.layers(ours)[0]
    name, point = next(iter(block.spec.linear_inputs.items()))
    ct_linear = theirs.get_submodule(f"{adapter.layers_path}.0.{name}")
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)) * 3
    step = x.abs().amax(-1, keepdim=True) / 127
    ct_x = forward_quantize(ct_linear, x, "input", ct_linear.quantization_scheme.input_activations)
    assert bool(((ct_x - block.taps[point](x)).abs() <= step * (1 + 1e-6)).all())
    _assert_matches_with_and_without_activation_quant(ours, adapter, theirs)


def test_w8a8_static_per_tensor_input_quantizer_is_ours(models, tmp_path):
    """SmoothQuant's static mode: the format stores our scale; inside the calibrated range the runtime's
    fake-quantized input is ours bit for bit (beyond it, the format clamps negatives at -128, ours at -127)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from transformers import AutoModelForCausalLM

    ours_dir, export, _ = _export(models, tmp_path, "opt", ["--method", "smoothquant"])
    (scheme,) = _quantization_config(export)["config_groups"].values()
    assert scheme["input_activations"]["dynamic"] is False and scheme["input_activations"]["strategy"] == "tensor"
    theirs = AutoModelForCausalLM.from_pretrained(str(export))
    ours, adapter = _ours(ours_dir)
    for i, block in enumerate(adapter.layers(ours)):
        for name, point in block.spec.linear_inputs.items():
            tap = block.taps[point]
            ct_linear = theirs.get_submodule(f"{adapter.layers_path}.{i}.{name}")
            assert torch.equal(ct_linear.input_scale.data, tap.scale)
            x = torch.linspace(-127, 127, 5001) * tap.scale
            ct_x = forward_quantize(ct_linear, x, "input", ct_linear.quantization_scheme.input_activations)
            assert torch.equal(ct_x, tap(x))


REFUSALS = {
    "duquant": (["--method", "duquant", "--rotation_steps", "2"], "online rotations"),
    "gptqt": (["--wbits", "3", "--abits", "16", "--w_quantizer", "gptqt", "--reorder", ""], "--w_quantizer gptq"),
    "rptq_w4a4": ([], "use --w_group_size N"),
    "clusters_weight_only": (["--abits", "16"], "use --w_group_size N"),
    "norm_gather": (["--abits", "16", "--w_group_size", "32"], "--reorder 35"),
    "cluster_ranges": (["--abits", "8", "--w_group_size", "32", "--reorder", "35"], "per-cluster activation ranges"),
    "per_sequence": (["--abits", "8", "--reorder", "", "--a_dynamic"], "--a_dynamic_method per_token"),
    "fp16": (["--wbits", "16", "--abits", "16"], "not quantized"),
    "act_clip": (["--method", "duquant", "--transforms", "smooth"], "--act_clip 1"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unexportable_flags_are_refused_before_loading(tmp_path, capsys, case):
    flags, hint = REFUSALS[case]
    export, out = tmp_path / "ct", tmp_path / "out"
    # A model that does not exist: the refusal must come from the flags, before anything is loaded.
    code = cli.main([str(tmp_path / "no-model"), *flags, *RUN, "--export", "compressed-tensors", str(export),
                     "--output_path", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --export compressed-tensors: ")
    assert hint in err
    assert not export.exists() and not out.exists()


def test_bad_export_arguments(models, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    for target, fmt, hint in ((tmp_path / "file", "compressed-tensors", "is a file"),
                              (tmp_path / "busy", "compressed-tensors", "not a compressed-tensors export"),
                              (tmp_path / "new", "gguf", "unknown format")):
        code = cli.main([str(models["opt"]), *W4A16_G32, *RUN, "--export", fmt, str(target)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and hint in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "x" and not (tmp_path / "new").exists()


def test_loaded_checkpoint_is_checked_when_exported(models, tmp_path, capsys):
    """From --load_quantized the flags say nothing; the model itself is checked, and a refusal writes nothing."""
    saved = tmp_path / "q"
    assert cli.main([str(models["opt"]), *RUN, "--cache_dir", str(tmp_path / "cache"), "--R1_clusters", "4",
                     "--R4_clusters", "4", "--R5_clusters", "4", "--save_quantized", str(saved)]) == 0
    capsys.readouterr()
    export, out = tmp_path / "ct", tmp_path / "out"
    code = cli.main([str(models["opt"]), "--load_quantized", str(saved), "--export", "compressed-tensors",
                     str(export), "--output_path", str(out), "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --export compressed-tensors: layer 0 ")
    assert "--w_group_size" in err and not export.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ct.")]  # no temporary directory left


def test_export_from_load_quantized_replaces_an_earlier_export(models, tmp_path):
    ours_dir, export, first = _export(models, tmp_path, "opt", W4A16_G32)
    before = (export / "model.safetensors").read_bytes()
    assert cli.main([str(models["opt"]), "--load_quantized", str(ours_dir), "--export", "compressed-tensors",
                     str(export), "--no_progress"]) == 0
    assert (export / "model.safetensors").read_bytes() == before


def test_zero_point_outside_the_code_range_is_refused():
    # The reference grid puts a group whose range lies below 0 at zero point 2^(b-1): no b-bit code holds it.
    with pytest.raises(UserError, match="--w_range with_zero --grid full"):
        _signed_zero(torch.tensor([[3.0, 8.0]]), 4, "reference", "layer 0 fc1")
    assert torch.equal(_signed_zero(torch.tensor([[0.0, 15.0]]), 4, "full", "x"), torch.tensor([[-8, 7]],
                                                                                                dtype=torch.int8))
    assert _signed_zero(torch.zeros(2, 1), 8, "symmetric", "x") is None


def test_w4a8_fptq_per_token_reloads_with_exact_weights(models, tmp_path):
    """FPTQ's uniform case (every linear input per-token dynamic): int4 asymmetric weights in groups with 8-bit
    per-token inputs, int-quantized (zero points unpacked, so transformers' default load works)."""
    from transformers import AutoModelForCausalLM

    flags = ["--method", "fptq", "--w_group_size", "32", "--fptq_v0", "0", "--fptq_v1", "0"]
    ours_dir, export, results = _export(models, tmp_path, "opt", flags)
    qc = _quantization_config(export)
    (scheme,) = qc["config_groups"].values()
    assert qc["format"] == "int-quantized" and scheme["weights"]["num_bits"] == 4
    assert scheme["weights"]["symmetric"] is False and scheme["weights"]["group_size"] == 32
    assert scheme["input_activations"]["num_bits"] == 8 and scheme["input_activations"]["strategy"] == "token"
    assert results["export"]["not_in_format"] == {"k": "8-bit", "v": "8-bit"}  # FPTQ's KV cache quantizers
    theirs = AutoModelForCausalLM.from_pretrained(str(export))
    ours, adapter = _ours(ours_dir)
    _linear_input_only(ours, adapter)
    _assert_matches_with_and_without_activation_quant(ours, adapter, theirs)


def test_quarot_grid_weights_with_the_extra_negative_code_reload_exactly(models, tmp_path):
    """QuaRot's weight grid (codes -8..7, scale absmax / 7): clipped rows use code -8, which the format's
    symmetric int4 holds, so the exported weights are ours."""
    from transformers import AutoModelForCausalLM

    flags = ["--wbits", "4", "--abits", "16", "--reorder", "", "--grid", "quarot", "--w_quantizer", "rtn",
             "--w_clip", "0.85"]
    ours_dir, export, _ = _export(models, tmp_path, "llama", flags)
    (scheme,) = _quantization_config(export)["config_groups"].values()
    assert scheme["weights"]["symmetric"] is True and scheme["weights"]["strategy"] == "channel"
    ours, adapter = _ours(ours_dir)
    codes = [c["codes"] for block in adapter.layers(ours) for c in block.weight_codes.values()]
    assert min(int(c.min()) for c in codes) == -8 and max(int(c.max()) for c in codes) <= 7
    theirs = AutoModelForCausalLM.from_pretrained(str(export))
    with torch.no_grad():
        assert _rel(ours(_ids()).logits, theirs(_ids()).logits) <= TOL
