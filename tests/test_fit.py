"""Automatic out-of-core calibration: the memory estimate, the decision, and the CLI switch."""
import json

import pytest
import torch

import main as cli
from models.fit import GIB, MemoryNeed, estimate_need, fits_in_memory
from models.placement import module_bytes
from models.registry import adapter_for
from tests.helpers import save_tiny_opt_dir, tiny_opt


def test_estimate_matches_the_materialised_model():
    model = tiny_opt(seed=0, hidden=64, layers=3, ffn=128)
    adapter = adapter_for(model.config)
    need = estimate_need(model.config, adapter, torch.float32, nsamples=5, seqlen=32)
    assert need.weights == module_bytes(model) - sum(b.numel() * b.element_size() for b in model.buffers())
    assert need.layer == module_bytes(adapter.layers(model)[0])
    hessians = 4 * (3 * 64 * 64 + 128 * 128)  # q/k/v share one input; out_proj, fc1 at 64; fc2 at 128
    assert need.working == hessians + 2 * 5 * 32 * 64 * 4 + need.layer
    half = estimate_need(model.config, adapter, torch.float16, nsamples=5, seqlen=32)
    assert half.weights * 2 == need.weights


def test_decision_keeps_headroom():
    need = MemoryNeed(weights=8 * GIB, layer=GIB // 4, working=GIB)
    assert fits_in_memory(need, 11 * GIB)
    assert not fits_in_memory(need, 9 * GIB)  # 9 GiB needed, but a tenth stays free
    assert need.out_of_core < need.in_memory / 6


ARGS = ["--eval_ppl", "--ppl_datasets", "ptb", "--calib_dataset", "ptb", "--nsamples", "3", "--seqlen", "32",
        "--limit", "3", "--R1_clusters", "4", "--R4_clusters", "4", "--R5_clusters", "4", "--no_progress"]


def test_model_too_big_for_the_budget_is_calibrated_out_of_core(tmp_path, capsys, monkeypatch):
    import rptq.pipeline as pipeline

    model_dir = str(save_tiny_opt_dir(tmp_path / "m", seed=0, layers=3))
    common = [model_dir, *ARGS, "--cache_dir", str(tmp_path / "cache")]
    assert cli.main(common + ["--output_path", str(tmp_path / "explicit"), "--offload_dir", str(tmp_path / "off")]) == 0
    assert cli.main(common + ["--output_path", str(tmp_path / "roomy"), "--max_memory", "4"]) == 0
    assert "out of core" not in capsys.readouterr().out

    real, calls = pipeline.calibrate_block, []

    def dies_on_third_layer(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    tight = common + ["--output_path", str(tmp_path / "auto"), "--max_memory", "0.0001"]
    monkeypatch.setattr(pipeline, "calibrate_block", dies_on_third_layer)
    with pytest.raises(KeyboardInterrupt):
        cli.main(tight)
    assert "calibrating out of core" in capsys.readouterr().out
    assert json.loads((tmp_path / "auto" / "offload" / "state.json").read_text())["next_layer"] == 2
    monkeypatch.setattr(pipeline, "calibrate_block", real)
    assert cli.main(tight) == 0  # resumes from the automatic offload directory
    assert not (tmp_path / "auto" / "offload").exists()  # removed once the run succeeded

    res = {d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("explicit", "roomy", "auto")}
    assert res["auto"]["ppl"] == res["explicit"]["ppl"]
    assert res["auto"]["ppl"]["ptb"] == pytest.approx(res["roomy"]["ppl"]["ptb"], rel=1e-6)
    assert [res[d]["memory"]["out_of_core"] for d in ("explicit", "roomy", "auto")] == ["requested", None, "auto"]


def test_tasks_on_a_model_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    model_dir = str(save_tiny_opt_dir(tmp_path / "m", seed=0, layers=2))
    code = cli.main([model_dir, "--tasks", "piqa", "--tasks_source", "local", "--max_memory", "0.0001",
                     "--cache_dir", str(tmp_path / "cache"), "--output_path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit" in err and "--load_quantized" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_memory_budget_is_refused(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--max_memory", "0"]) == 2
    assert "--max_memory" in capsys.readouterr().err
