"""--method spinquant: Cayley SGD keeps R orthogonal and descends; learned R1/R2 fold exactly (FP logits
unchanged on tiny OPT and tiny Llama with GQA); a few steps lower the fake-quantized loss; the same seed
learns the same rotations; the command line records the learning and refuses what it cannot do."""
import copy
import json

import pytest
import torch

from models.registry import adapter_for
from quant.cayley import cayley_step, orthogonality_error
from rptq.methods import preset_config
from rptq.methods.spinquant import LEARNED, SpinSettings
from rptq.pipeline import quantize_model
from rptq.residual_rotate import fold_residual
from rptq.spin_learn import cosine_lr, learn_rotations
from tests.helpers import inject_opt_outliers, tiny_opt
from tests.test_cli import cache, model_dir  # noqa: F401  (shared fixtures)
from tests.test_cli_methods import run, small
from tests.test_llama import inject_outliers, tiny_llama

TRANSFORMS = ("residual_rotate", "spin_rotate", "head_rotate", "qk_rotate", "mlp_rotate")
MODELS = {"opt": lambda: inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1),
          "llama_gqa": lambda: inject_outliers(tiny_llama(bias=True))}  # 4 query heads on 2 K/V heads


def _ids(n=4, t=32, seed=0):
    return torch.randint(4, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


def _learn(model, steps=6, seed=2, lr=1.5, samples=4, **cfg):
    folded = copy.deepcopy(model)
    adapter = adapter_for(folded.config)
    fold_residual(folded, adapter)
    config = preset_config("spinquant", **cfg, seed=seed)
    return learn_rotations(folded, adapter, _ids(), config, SpinSettings(steps=steps, lr=lr, samples=samples))


def test_cayley_step_stays_orthogonal_and_descends():
    """min ||R - T||^2 over orthogonal R (T orthogonal): 300 steps, R stays orthogonal to 1e-12 and
    reaches T; every step lowers the objective."""
    gen = torch.Generator().manual_seed(0)
    target, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))
    r = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0]
    if torch.det(r) * torch.det(target) < 0:  # the same component of O(n), else T is unreachable
        r[:, 0] = -r[:, 0]
    first = last = float((r - target).pow(2).sum())
    for _ in range(300):
        taken = cayley_step(r, 2 * (r - target), lr=0.5)
        value = float((taken.rotation - target).pow(2).sum())
        assert value <= last + 1e-12
        r, last = taken.rotation, value
        assert orthogonality_error(r) < 1e-6
    assert orthogonality_error(r) < 1e-12
    assert last < 1e-6 * first, (first, last)


def test_cayley_step_size_is_capped_and_cosine_schedule():
    r = torch.eye(8, dtype=torch.float64)
    g = torch.zeros(8, 8, dtype=torch.float64)
    g[0, 1] = 100.0  # a large gradient: the step is 1 / ||A||_1 = 1 / 50, not lr
    taken = cayley_step(r, g, lr=1.5)
    assert taken.alpha == pytest.approx(1 / 50, rel=1e-6)
    assert cosine_lr(1.5, 0, 10) == 1.5 and cosine_lr(1.5, 5, 10) == pytest.approx(0.75)


@pytest.mark.parametrize("name", list(MODELS))
def test_learned_rotations_fold_exactly(name):
    """Learn R1/R2 with W4A4 fake quantization (they move away from the Hadamards), then fold them with
    quantization off: the logits are the unrotated FP model's to 1e-4; R1 and every R2 are orthogonal."""
    model = MODELS[name]()
    learned = _learn(model, steps=4)
    assert orthogonality_error(learned.r1) < 1e-6 and all(orthogonality_error(r) < 1e-6 for r in learned.r2)
    assert learned.report["r1_step_sizes"][0] > 0.01  # R1 moved
    heads = model.config.num_attention_heads
    assert len(learned.r2) == model.config.num_hidden_layers and learned.r2[0].shape[0] == 64 // heads
    ids = _ids(3, 24, seed=1)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    folded = copy.deepcopy(model)
    fp = preset_config("spinquant", disable_w_quant=True, disable_a_quant=True)
    report = quantize_model(folded, adapter_for(folded.config), _ids(), fp, progress=False, given={LEARNED: learned})
    assert report.summary()["residual_rotation"]["kind"].startswith("learned")
    assert all(d["points"][p]["head_rotate"]["kind"] == "learned" for d in report.decisions()
               for p in d["points"] if "head_rotate" in d["points"][p])
    with torch.no_grad():
        out = folded(ids, use_cache=False).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_cayley_steps_lower_the_fake_quantized_loss(name):
    """Cayley SGD lowers the fake-quantized cross-entropy it descends: W4A8, RTN weights fake-quantized while
    learning (straight-through), 20 steps at lr 0.5 on one window. Measured drop over seeds 0-4 (torch 2.13
    CPU): opt 0.036-0.067, llama GQA 0.047-0.364; the bound is under a third of the smallest. (At 4-bit
    activations the rounding makes the objective jagged: 10 steps at lr 1.5 over 4 windows gave drops from
    -0.09 to +0.17 across seeds, so a W4A4 bound held on one machine and one seed only.)"""
    report = _learn(MODELS[name](), steps=20, lr=0.5, samples=1, w_quantizer="rtn", w_clip_fit="", abits=8).report
    assert report["loss_after"] < report["loss_before"] - 0.01, report
    assert report["r2_orthogonality_error"] < 1e-6 and report["r1_orthogonality_error"] < 1e-6


def test_gptq_runs_learn_against_full_precision_weights_rtn_runs_against_rtn_weights():
    """The released README: with GPTQ weights the rotations are learned on the W16A4KV4 network; with RTN the
    weights are fake-quantized while learning. So the learning loss of a W4 GPTQ run equals that of a W16 run,
    and a W4 RTN run's is higher (its weights are on the 4-bit grid)."""
    model = MODELS["llama_gqa"]()
    gptq, w16, rtn = (_learn(model, steps=0, **cfg).report for cfg in
                      ({}, {"wbits": 16}, {"w_quantizer": "rtn", "w_clip_fit": ""}))
    assert gptq["weights_while_learning"] == w16["weights_while_learning"] == "full precision"
    assert rtn["weights_while_learning"] == "rtn 4-bit (STE)"
    assert gptq["loss_before"] == w16["loss_before"]
    assert rtn["loss_before"] > gptq["loss_before"] + 1e-3, (rtn["loss_before"], gptq["loss_before"])


def test_same_seed_same_rotations():
    model = MODELS["llama_gqa"]()
    a, b, c = _learn(model, steps=3), _learn(model, steps=3), _learn(model, steps=3, seed=3)
    assert torch.equal(a.r1, b.r1) and all(torch.equal(x, y) for x, y in zip(a.r2, b.r2))
    assert not torch.allclose(a.r1, c.r1)  # another seed, another start


def test_spinquant_from_the_command_line(model_dir, cache, tmp_path, capsys):  # noqa: F811
    code, err = run(small(model_dir, cache, tmp_path / "out", "--method", "spinquant", "--spin_steps", "3",
                          "--spin_samples", "2", "--eval_base_ppl"), capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["method"]["transforms"] == list(TRANSFORMS)
    spin = res["calibration"]["spin_rotation"]
    assert spin["steps"] == 3 and spin["lr"] == 1.5 and spin["samples"] == 2 and len(spin["step_losses"]) == 3
    assert spin["r1_orthogonality_error"] < 1e-6 and spin["seconds"] > 0 and spin["loss_after"] > 0
    assert res["calibration"]["residual_rotation"]["kind"].startswith("learned (SpinQuant)")
    manifest = res["bit_manifest"]
    assert manifest["out_in"]["granularity"].startswith("token x head dynamic, asymmetric")
    assert manifest["fc2_in"]["granularity"] == "token dynamic, asymmetric, clip 1.0"
    assert any("SpinQuant" in a for a in res["method"]["assumptions"])
    # quantized / FP measured 1.0007-1.0045 over --seed 0-4 on this tiny random model
    assert 0.97 < res["ppl"]["ptb"] / res["ppl_base"]["ptb"] < 1.03


@pytest.mark.parametrize("extra,message", [
    (["--method", "quarot", "--spin_steps", "4"], "--spin_steps is used only with the spin_rotate step"),
    (["--method", "rptq", "--spin_lr", "1.0"], "--spin_lr is used only with the spin_rotate step"),
    (["--method", "spinquant", "--spin_samples", "5"], "exceeds the 2 calibration windows"),
    (["--method", "spinquant", "--spin_lr", "0"], "--spin_lr must be positive"),
    (["--method", "spinquant", "--transforms", "spin_rotate,head_rotate"], "add residual_rotate"),
    (["--method", "spinquant", "--save_quantized", "SAVE"], "cannot yet store a residual-rotated model"),
])
def test_spinquant_refusals_are_one_line(model_dir, cache, tmp_path, capsys, extra, message):  # noqa: F811
    extra = [str(tmp_path / "save") if e == "SAVE" else e for e in extra]
    code, err = run(small(model_dir, cache, tmp_path / "out", *extra), capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "save").exists()
