"""A corrupt or mismatched checkpoint directory is a one-line error (in process and from the
command line), and --pack_weight's size report matches the files it wrote."""
import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import main as cli
from common.errors import UserError
from models.registry import adapter_for
from rptq.checkpoint import load_quantized, save_quantized
from rptq.pipeline import quantize_model
from tests.helpers import save_tiny_opt_dir
from tests.test_checkpoint_pack import CPU, SMALL, _config, _opt, _windows, tokenizer  # noqa: F401 (fixture)


# -- corrupt or mismatched directories -----------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("saved")
    model, vocab = _opt()
    adapter = adapter_for(model.config)
    quantize_model(model, adapter, _windows(vocab, n=2, seqlen=32), _config(*SMALL), progress=False)
    save_quantized(root / "q", model, adapter, tokenizer, {"bit_manifest": {}})
    return root / "q"


def _edit_block(path, drop=(), meta_update=None):
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    meta.update({k: json.dumps(v) for k, v in (meta_update or {}).items()})
    save_file(tensors, path, metadata=meta)


def _edit_json(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


CORRUPTIONS = {
    "no quant.json": (lambda d: (d / "quant.json").unlink(), "no quant.json"),
    "quant.json garbage": (lambda d: (d / "quant.json").write_text("{not json"), "not valid JSON"),
    "unknown format": (lambda d: _edit_json(d / "quant.json", lambda j: j.update(format="rptq-block-v9")),
                       "unknown checkpoint format 'rptq-block-v9'"),
    "missing block": (lambda d: (d / "block-00001.safetensors").unlink(), "missing file block-00001"),
    "truncated block": (lambda d: (d / "block-00000.safetensors").write_bytes(
        (d / "block-00000.safetensors").read_bytes()[:5000]), "block-00000.safetensors is not a readable"),
    "missing tensor": (lambda d: _edit_block(d / "block-00001.safetensors", drop=("qweight.fc1.scale",)),
                       "missing tensor qweight.fc1.scale"),
    "missing bias": (lambda d: _edit_block(d / "block-00000.safetensors", drop=("layer.fc2.bias",)),
                     "missing tensor layer.fc2.bias"),
    "block format": (lambda d: _edit_block(d / "block-00000.safetensors", meta_update={"format": "rptq-block-v9"}),
                     "block format 'rptq-block-v9'"),
    "config shapes": (lambda d: _edit_json(d / "config.json", lambda j: j.update(ffn_dim=96)),
                      "layer.fc1.weight has shape (128, 64), the model's config needs (96, 64)"),
    "layer count": (lambda d: _edit_json(d / "config.json", lambda j: j.update(num_hidden_layers=3)),
                    "quant.json lists 2 layers, config.json 3"),
    "resident": (lambda d: save_file({k: v for k, v in load_file(d / "resident.safetensors").items()
                                      if "embed_positions" not in k}, d / "resident.safetensors"),
                 "resident.safetensors: missing tensor"),
    "manifest bits": (lambda d: _edit_json(d / "quant.json", lambda j: j["linears"][1]["fc2"].update(bits=3)),
                      "block 1 fc2: quant.json lists [64, 128] at 3 bits, the block file holds [64, 128] at 4"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_directory_is_one_line_user_error(saved, tmp_path, case):
    corrupt, needle = CORRUPTIONS[case]
    root = tmp_path / "q"
    shutil.copytree(saved, root)
    corrupt(root)
    with pytest.raises(UserError) as err:
        load_quantized(root, CPU)
    message = str(err.value)
    assert needle in message and str(root) in message and "\n" not in message


def test_cli_corrupt_directory_exits_2_and_writes_nothing(saved, tmp_path, capsys):
    root = tmp_path / "q"
    shutil.copytree(saved, root)
    _edit_block(root / "block-00001.safetensors", drop=("qweight.self_attn.q_proj.codes",))
    out = tmp_path / "out"
    code = cli.main(["tiny", "--load_quantized", str(root), "--eval_ppl", "--ppl_datasets", "ptb", "--seqlen", "32",
                     "--output_path", str(out), "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --load_quantized") and len(err.splitlines()) == 1
    assert "missing tensor qweight.self_attn.q_proj.codes" in err
    assert not out.exists()


def test_cli_pack_weight_reports_size_and_reloads_exactly(tmp_path, capsys):
    model_dir = save_tiny_opt_dir(tmp_path / "m", seed=0, layers=2)
    common = ["--eval_ppl", "--ppl_datasets", "ptb", "--seqlen", "32", "--limit", "2",
              "--cache_dir", str(tmp_path / "cache"), "--no_progress"]
    assert cli.main([str(model_dir), "--calib_dataset", "ptb", "--nsamples", "2", *SMALL, *common, "--pack_weight",
                     "--save_quantized", str(tmp_path / "q"), "--output_path", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    saved_run = json.loads((tmp_path / "a" / "results.json").read_text())
    size = saved_run["checkpoint"]
    manifest = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert manifest["size"] == {k: v for k, v in size.items() if k != "path"} and manifest["format"] == "rptq-block-v3"
    assert f"checkpoint {tmp_path / 'q'}: " in printed and f"({size['ratio']:.4f}x;" in printed
    assert size["float_linears"] == 0 and size["decoder_weight_bytes_fp16"] == 2 * 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert {e["scale_format"] for layer in manifest["linears"] for e in layer.values()} == {"fp16"}
    assert cli.main([str(model_dir), "--load_quantized", str(tmp_path / "q"), *common,
                     "--output_path", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["ppl"] == saved_run["ppl"]
    assert cli.main([str(model_dir), "--pack_weight", "--scale_format", "exact", "--save_quantized",
                     str(tmp_path / "x")]) == 2
    assert "contradicts --scale_format exact" in capsys.readouterr().err
