"""Save/load, resumable and out-of-core calibration: each must equal the plain in-memory run."""
import copy
import json

import pytest
import torch

import main as cli
from eval.ppl import perplexity, streamed_perplexity
from models.registry import adapter_for
from models.streaming import layer_loader, load_skeleton
from rptq.checkpoint import load_quantized, save_quantized
from rptq.layer_store import LayerStore
from common.errors import UserError
from rptq.pipeline import quantize_model
from tests.helpers import gpt2_tokenizer, inject_opt_outliers, rptq_config, save_tiny_opt_dir, tiny_opt

CFG = rptq_config(wbits=4, abits=4, clusters={"R1": 4, "R2": 2, "R3": 2, "R4": 4, "R5": 4})


@pytest.fixture(scope="module")
def setup():
    model = inject_opt_outliers(tiny_opt(seed=0, layers=3), seed=1)
    windows = torch.randint(4, 50000, (6, 48), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    quantize_model(reference, adapter_for(reference.config), windows, CFG, progress=False)
    with torch.no_grad():
        logits = reference(windows).logits
    return model, windows, reference, logits


def test_save_then_load_reproduces_logits(setup, tmp_path):
    _, windows, reference, logits = setup
    save_quantized(tmp_path / "q", reference, adapter_for(reference.config), gpt2_tokenizer(tmp_path / "tok"),
                   {"bit_manifest": {}})
    loaded, _, _, info = load_quantized(tmp_path / "q", torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, logits)
    assert info["num_layers"] == 3


def test_interrupted_calibration_resumes_to_identical_result(setup, tmp_path):
    model, windows, _, logits = setup
    store = LayerStore(tmp_path / "state")

    def crash_after_layer_1(i):
        if i == 1:
            raise KeyboardInterrupt

    first = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(first, adapter_for(first.config), windows, CFG, progress=False, store=store,
                       fingerprint="run-a", on_layer_done=crash_after_layer_1)
    assert store.progress()["next_layer"] == 2
    resumed = copy.deepcopy(model)
    report = quantize_model(resumed, adapter_for(resumed.config), windows, CFG, progress=False, store=store,
                            fingerprint="run-a")
    assert len(report.layers) == 1  # only the last layer was calibrated again
    with torch.no_grad():
        assert torch.equal(resumed(windows).logits, logits)


def test_state_from_other_arguments_is_refused(setup, tmp_path):
    model, windows, _, _ = setup
    store = LayerStore(tmp_path / "state")
    quantize_model(copy.deepcopy(model), adapter_for(model.config), windows, CFG, progress=False, store=store,
                   fingerprint="run-a")
    with pytest.raises(UserError, match="different model, data, seed"):
        quantize_model(copy.deepcopy(model), adapter_for(model.config), windows, CFG, progress=False,
                       store=store, fingerprint="run-b")


def test_out_of_core_equals_in_memory(setup, tmp_path):
    model, windows, reference, _ = setup
    model.save_pretrained(str(tmp_path / "ckpt"), max_shard_size="2MB")  # several shards
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    adapter = adapter_for(model.config)
    skeleton, reader = load_skeleton(tmp_path / "ckpt", adapter, torch.float32, torch.device("cpu"))
    assert all(p.is_meta for p in adapter.layers(skeleton).parameters())  # no layer weights resident
    store = LayerStore(tmp_path / "blocks")
    quantize_model(skeleton, adapter, windows, CFG, progress=False, store=store, fingerprint="x",
                   layer_source=layer_loader(skeleton, adapter, reader, torch.float32), offload=True)
    assert all(p.is_meta for p in adapter.layers(skeleton).parameters())  # released after writing
    spec = adapter.block_spec(skeleton.config)
    layers = adapter.layers(skeleton)
    streamed = streamed_perplexity(skeleton, adapter, windows, lambda i: store.load_block(
        i, adapter.make_block(layers[i], spec)), progress=False)
    assert streamed == pytest.approx(perplexity(reference, windows, progress=False), rel=1e-6)


def test_cli_offload_save_load_and_resume(tmp_path, capsys):
    model_dir = save_tiny_opt_dir(tmp_path / "m", seed=0, layers=2)
    common = [str(model_dir), "--eval_ppl", "--ppl_datasets", "ptb", "--calib_dataset", "ptb", "--nsamples", "3",
              "--seqlen", "32", "--limit", "3", "--R1_clusters", "4", "--R4_clusters", "4", "--R5_clusters", "4",
              "--cache_dir", str(tmp_path / "cache"), "--no_progress"]
    assert cli.main(common + ["--output_path", str(tmp_path / "mem"), "--save_quantized", str(tmp_path / "q")]) == 0
    assert cli.main(common + ["--output_path", str(tmp_path / "ooc"), "--offload_dir", str(tmp_path / "off")]) == 0
    assert cli.main([str(model_dir), "--load_quantized", str(tmp_path / "q"), "--eval_ppl", "--ppl_datasets", "ptb",
                     "--seqlen", "32", "--limit", "3", "--cache_dir", str(tmp_path / "cache"), "--no_progress",
                     "--output_path", str(tmp_path / "loaded")]) == 0
    assert not (tmp_path / "mem" / "calibration_state").exists()  # resume state removed after success
    ppl = {d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("mem", "ooc", "loaded")}
    assert ppl["mem"]["ppl"]["ptb"] == pytest.approx(ppl["ooc"]["ppl"]["ptb"], rel=1e-6)
    assert ppl["loaded"]["ppl"]["ptb"] == ppl["mem"]["ppl"]["ptb"]
    capsys.readouterr()


def test_cli_killed_run_resumes_with_identical_results(tmp_path, capsys, monkeypatch):
    import rptq.pipeline as pipeline

    model_dir = save_tiny_opt_dir(tmp_path / "m", seed=0, layers=3)
    args = [str(model_dir), "--eval_ppl", "--ppl_datasets", "ptb", "--calib_dataset", "ptb", "--nsamples", "3",
            "--seqlen", "32", "--limit", "3", "--R1_clusters", "4", "--R4_clusters", "4", "--R5_clusters", "4",
            "--cache_dir", str(tmp_path / "cache"), "--no_progress"]
    assert cli.main(args + ["--output_path", str(tmp_path / "straight")]) == 0

    real = pipeline.calibrate_block
    calls = []

    def dies_on_third_layer(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a killed job
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "calibrate_block", dies_on_third_layer)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args + ["--output_path", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert json.loads((tmp_path / "resumed" / "calibration_state" / "state.json").read_text())["next_layer"] == 2
    monkeypatch.setattr(pipeline, "calibrate_block", real)
    assert cli.main(args + ["--output_path", str(tmp_path / "resumed")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "resumed"))
    assert a["ppl"] == b["ppl"]
    # a different seed in the same directory is refused, not silently reused
    monkeypatch.setattr(pipeline, "calibrate_block", dies_on_third_layer)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        cli.main(args + ["--output_path", str(tmp_path / "other")])
    monkeypatch.setattr(pipeline, "calibrate_block", real)
    assert cli.main(args + ["--output_path", str(tmp_path / "other"), "--seed", "7"]) == 2
    assert "different model, data, seed" in capsys.readouterr().err


def test_gptq_sweeps_side_by_side_equal_one_at_a_time(setup):
    """In memory, two inputs' GPTQ sweeps run concurrently (each on one thread); out of core one at a
    time. Same weights and codes bit for bit, same errors."""
    from rptq.calibrate import calibrate_block
    from models.execution import capture_block_inputs

    model, windows, _, _ = setup
    adapter = adapter_for(model.config)
    spec = adapter.block_spec(model.config)
    inputs, kwargs = capture_block_inputs(model, adapter.layers(model), windows, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the concurrent path needs a second thread
    try:
        runs = []
        for side_by_side in (True, False):
            block = adapter.make_block(copy.deepcopy(adapter.layers(model)[0]), spec)
            outputs, timing = calibrate_block(block, inputs, kwargs, CFG, side_by_side=side_by_side)
            runs.append((block, outputs, timing))
    finally:
        torch.set_num_threads(threads)
    (a, out_a, t_a), (b, out_b, t_b) = runs
    assert torch.get_num_threads() == threads
    for name in spec.linear_inputs:
        assert torch.equal(a.module(name).weight, b.module(name).weight), name
        assert torch.equal(a.weight_codes[name]["scale"], b.weight_codes[name]["scale"]), name
    assert not torch.equal(a.module("fc2").weight, adapter.layers(model)[0].fc2.weight)  # it did quantize
    assert torch.equal(out_a, out_b)
    assert t_a.errors == t_b.errors
