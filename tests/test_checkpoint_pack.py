"""Packed checkpoints (#15): every method saves packed codes and reloads to the same perplexity,
bit for bit; sizes are real bytes and meet the targets on the OPT-125m shape; binary-coded
(GPTQT) entries round-trip. Corrupt directories: tests/test_checkpoint_corrupt.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

import main as cli
from rptq.flags import quant_config
from eval.ppl import perplexity
from models.registry import adapter_for
from models.synthetic import OPT_125M_SHAPE
from quant.packing import affine_nbytes
from quant.quantizer import dequantize_weight, expand_groups, fake_quant, weight_codes, weight_group_params
from rptq.block_file import block_file_summary, load_block
from rptq.checkpoint import load_quantized, save_quantized
from rptq.layer_store import LayerStore
from rptq.tensor_file import read_tensors
from models.execution import wrap_blocks
from rptq.pipeline import quantize_model
from tests.helpers import gpt2_tokenizer, inject_opt_outliers, random_opt, tiny_opt
from tests.test_llama import inject_outliers as inject_llama_outliers
from tests.test_llama import tiny_llama

SMALL = ["--R1_clusters", "4", "--R2_clusters", "2", "--R3_clusters", "2", "--R4_clusters", "4", "--R5_clusters", "4"]
CPU = torch.device("cpu")


def _config(*argv):
    return quant_config(cli.build_parser().parse_args(["tiny", *argv]))


def _windows(vocab, n=4, seqlen=48, seed=0):
    return torch.randint(4, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _opt():
    return inject_opt_outliers(tiny_opt(seed=0, layers=2, vocab=1000), seed=1), 1000


def _llama():
    return inject_llama_outliers(tiny_llama(seed=0)), 1000


def _linears(root):
    return json.loads((root / "quant.json").read_text())["linears"]


def _check_bytes(root, size):
    """The size section adds up the real tensors: affine_nbytes per linear plus 8 bytes per zero exception."""
    total = 0
    for path in sorted(root.glob("block-*.safetensors")):
        tensors, meta = read_tensors(path)
        for name, m in meta["packed"].items():
            rows, cols = m["shape"]
            total += affine_nbytes(rows, cols, len(m["group_sizes"]), m["bits"], m["scale_format"], m["zero_bits"])
            total += 8 * m["zero_exceptions"]
            assert f"layer.{name}.weight" not in tensors  # no float copy beside the codes
    assert size["decoder_weight_bytes_packed"] == total


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return gpt2_tokenizer(tmp_path_factory.mktemp("tok"))


CASES = [  # (model, flags, scale format stored)
    ("opt", ["--wbits", "4", "--abits", "4", *SMALL], "fp32"),
    ("opt", ["--wbits", "3", "--abits", "8", *SMALL], "fp32"),
    ("opt", ["--wbits", "4", "--pack_weight", *SMALL], "fp16"),
    ("opt", ["--wbits", "2", "--scale_format", "sf8", *SMALL], "sf8"),
    ("opt", ["--method", "smoothquant"], "fp32"),
    ("opt", ["--method", "fptq"], "fp32"),
    ("opt", ["--method", "duquant", "--rotation_steps", "4", "--rotation_block", "16"], "fp32"),
    ("llama", ["--wbits", "4", "--abits", "4", *SMALL], "fp32"),
    ("llama", ["--wbits", "3", "--abits", "8", "--pack_weight", *SMALL], "fp16"),
    ("llama", ["--method", "duquant", "--rotation_steps", "4", "--rotation_block", "16"], "fp32"),
]


@pytest.mark.parametrize("arch,flags,scale_format", CASES, ids=[f"{c[0]}-{'_'.join(c[1][:4])}" for c in CASES])
def test_packed_save_load_reproduces_perplexity(arch, flags, scale_format, tokenizer, tmp_path):
    model, vocab = _opt() if arch == "opt" else _llama()
    cfg = _config(*flags)
    windows = _windows(vocab)
    adapter = adapter_for(model.config)
    quantize_model(model, adapter, windows, cfg, progress=False)
    with torch.no_grad():
        logits = model(windows).logits
    ppl = perplexity(model, windows, progress=False)
    size = save_quantized(tmp_path / "q", model, adapter, tokenizer, {"bit_manifest": {}})
    per_layer = len(adapter.block_spec(model.config).linear_inputs)
    assert size["packed_linears"] == 2 * per_layer and size["float_linears"] == 0
    assert {e["scale_format"] for layer in _linears(tmp_path / "q") for e in layer.values()} == {scale_format}
    assert {e["bits"] for layer in _linears(tmp_path / "q") for e in layer.values()} == {cfg.wbits}
    _check_bytes(tmp_path / "q", size)
    assert size["ratio"] == round(size["decoder_weight_bytes_packed"] / size["decoder_weight_bytes_fp16"], 6)
    loaded, _, _, _ = load_quantized(tmp_path / "q", CPU)
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, logits)
    assert perplexity(loaded, windows, progress=False) == ppl  # the same number, not close


@pytest.mark.parametrize("bits,flag,target", [(4, "--pack_weight", 0.30), (3, "--scale_format=sf8", 0.22),
                                              (2, "--scale_format=sf8", 0.16)])
def test_opt125m_shape_meets_size_targets(bits, flag, target, tokenizer, tmp_path):
    """One OPT-125m-shaped decoder layer, RPTQ's default clusters, RTN: codes + scales + zeros vs fp16."""
    shape = dict(OPT_125M_SHAPE, num_hidden_layers=1, vocab_size=1000, max_position_embeddings=128)
    model = inject_opt_outliers(random_opt(seed=0, **shape), seed=1)
    adapter = adapter_for(model.config)
    cfg = _config("--wbits", str(bits), "--abits", "16", "--w_quantizer", "rtn", flag)
    quantize_model(model, adapter, _windows(1000, n=2, seqlen=32), cfg, progress=False)
    size = save_quantized(tmp_path / "q", model, adapter, tokenizer, {"bit_manifest": {}})
    assert size["decoder_weight_bytes_fp16"] == 2 * 7077888 and size["float_linears"] == 0
    assert size["ratio"] <= target
    loaded = load_quantized(tmp_path / "q", CPU)[0]
    for name in adapter.block_spec(model.config).linear_inputs:
        got, want = (adapter.layers(m)[0].module(name).weight for m in (loaded, model))
        assert torch.equal(got, want)


def test_sf8_snaps_scales_and_flat_groups_stay_on_the_code_grid():
    """--scale_format sf8: scales rounded up onto sf8; a constant group (one-channel cluster) gets
    a zero point on the code grid and its value within the scale's precision."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 40, generator=gen) * 0.02
    sizes = (10, 1, 19, 1, 9)
    cfg = _config("--wbits", "3", "--scale_format", "sf8")
    from rptq.methods import weight_spec

    spec = weight_spec(cfg, 40, sizes)
    exact = weight_group_params(w, sizes, 3, weight_spec(_config("--wbits", "3"), 40, sizes))[0]
    scale, zero = weight_group_params(w, sizes, 3, spec)
    normal = [0, 2, 4]
    ratio = scale[:, normal] / exact[:, normal]
    assert bool((ratio >= 1).all()) and float(ratio.max()) <= 1.0625
    assert bool(((zero >= -4) & (zero <= 4)).all())  # every zero on the 3-bit signed grid's window
    w_hat = fake_quant(w, expand_groups(scale, sizes), expand_groups(zero, sizes), 3, "reference")
    flat = w[:, [10, 30]]
    assert float(((w_hat[:, [10, 30]] - flat).abs() / flat.abs()).max()) < 0.04


def _blocks(seed=0):
    model = tiny_opt(seed=seed, layers=1)
    adapter = adapter_for(model.config)
    wrap_blocks(model, adapter)
    return model, adapter, adapter.layers(model)[0]


def test_binary_coded_weights_round_trip_through_a_block_file(tmp_path):
    """A GPTQT entry built by hand: planes, alpha, offset; dequantized in the documented order."""
    _, adapter, block = _blocks()
    fc1 = block.module("fc1")
    rows, cols = fc1.weight.shape
    k, sizes = 3, (20, 44)
    gen = torch.Generator().manual_seed(3)
    planes = torch.rand(k, rows, cols, generator=gen) > 0.5
    alpha = torch.rand(rows, len(sizes), k, generator=gen) * 0.01
    offset = torch.randn(rows, len(sizes), generator=gen) * 0.01
    w_hat = expand_groups(offset, sizes)
    for i in range(k):
        w_hat = w_hat + expand_groups(alpha[..., i], sizes) * (planes[i].float() * 2 - 1)
    fc1.weight.data = w_hat
    block.weight_codes["fc1"] = {"kind": "binary", "planes": planes, "alpha": alpha, "offset": offset,
                                 "group_sizes": sizes}
    fc2 = block.module("fc2")  # and one affine linear beside it
    codes, scale, zero = weight_codes(fc2.weight.data, None, 4)
    fc2.weight.data = dequantize_weight(codes, scale, zero, None)
    block.weight_codes["fc2"] = {"kind": "affine", "codes": codes, "scale": scale, "zero": zero, "bits": 4,
                                 "grid": "full", "group_sizes": None}
    block.gathers["qkv_in"] = torch.randperm(64, generator=gen)

    store = LayerStore(tmp_path)
    store.save_block(0, block)
    tensors, _ = read_tensors(store.block_path(0))
    assert tensors["qweight.fc1.planes"].shape == (k, rows, cols // 8) and "layer.fc1.weight" not in tensors
    assert tensors["gather.qkv_in"].dtype == torch.int16
    summary = block_file_summary(store.block_path(0), ("fc1", "fc2", "self_attn.q_proj"))
    assert summary["fc1"]["bytes"] == k * rows * cols // 8 + 4 * rows * len(sizes) * (k + 1)
    assert summary["fc1"]["kind"] == "binary" and summary["self_attn.q_proj"]["kind"] == "float"

    _, _, fresh = _blocks(seed=9)
    fresh.weight_codes.clear()
    loaded = store.load_block(0, fresh)
    assert torch.equal(loaded.module("fc1").weight.view(torch.int32), w_hat.view(torch.int32))
    assert torch.equal(loaded.module("fc2").weight, fc2.weight)
    assert torch.equal(loaded.gathers["qkv_in"], block.gathers["qkv_in"])
    assert torch.equal(loaded.weight_codes["fc1"]["planes"], planes)
    assert torch.equal(loaded.weight_codes["fc2"]["codes"], codes)  # the quantizer's integers, as handed over
    # Saved again from the reloaded codes (a resumed calibration): the same file contents.
    store.save_block(1, loaded)
    again = load_file(store.block_path(1))
    assert again.keys() == tensors.keys() and all(torch.equal(again[n], tensors[n]) for n in tensors)


@pytest.mark.parametrize("keep_codes", [True, False])
def test_weight_off_its_grid_is_stored_float_with_a_warning(tmp_path, keep_codes):
    """Codes that are not the weight's (it was never quantized), or no codes at all: never recovered
    from the floats, the weight stays float."""
    _, _, block = _blocks()
    fc2 = block.module("fc2")
    codes, scale, zero = weight_codes(fc2.weight.data, None, 4)  # the grid, but the weight was never quantized
    block.weight_codes["fc2"] = {"scale": scale, "zero": zero, "bits": 4, "grid": "full", "group_sizes": None}
    if keep_codes:
        block.weight_codes["fc2"]["codes"] = codes
    with pytest.warns(UserWarning, match="fc2 is stored as a float tensor"):
        LayerStore(tmp_path).save_block(0, block)
    assert block_file_summary(LayerStore(tmp_path).block_path(0), ("fc2",))["fc2"]["kind"] == "float"
    _, _, fresh = _blocks(seed=9)
    assert torch.equal(load_block(fresh, LayerStore(tmp_path).block_path(0)).module("fc2").weight, fc2.weight)
