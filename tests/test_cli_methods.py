"""The command line of the method family: presets, reference flags, bad combinations."""
import json

import pytest

import main as cli
from tests.test_cli import cache, model_dir  # noqa: F401  (shared fixtures)


def run(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def small(model_dir, cache, out, *extra):
    return [str(model_dir), "--eval_ppl", "--ppl_datasets", "ptb", "--calib_dataset", "ptb", "--nsamples", "2",
            "--seqlen", "32", "--limit", "2", "--cache_dir", cache, "--no_progress", "--output_path", str(out),
            *extra]


@pytest.mark.parametrize("extra,check", [
    (["--method", "smoothquant"], lambda r: r["method"]["transforms"] == ["smooth"] and r["config"]["wbits"] == 8),
    (["--method", "fptq"], lambda r: r["config"]["w_group_size"] == 128 and r["config"]["abits"] == 8
     and all("strategy" in p for layer in r["decisions"] for p in layer["points"].values())),
    (["--method", "duquant", "--rotation_block", "16", "--rotation_steps", "8"],
     lambda r: r["config"]["w_clip"] == 0.8 and r["bit_manifest"]["fc2_in"]["static"] is False
     and r["bit_manifest"]["qkv_in"]["transforms"] == ["scale@norm", "rotation@online", "permutation@online",
                                                       "rotation@online"]
     and r["bit_manifest"]["fc2_in"]["transforms"][0] == "scale@rows"),
    (["--w_quantizer", "normal", "--metric", "mse", "--R1_clusters", "4"], lambda r: r["config"]["w_quantizer"] == "rtn"),
    (["--metric", "layer_mse", "--eval_base_ppl", "--R4_clusters", "4"], lambda r: "layer_mse_clip" in r["decisions"][0]["points"]
     and r["ppl_base"]["ptb"] > 1),
    (["--wbits", "3", "--abits", "16", "--w_quantizer", "gptqt", "--reorder", ""],
     lambda r: r["bit_manifest"]["weight:fc1"]["granularity"] == "row binary-coded"),
])
def test_presets_and_reference_flags_run(model_dir, cache, tmp_path, capsys, extra, check):
    code, err = run(small(model_dir, cache, tmp_path / "out", *extra), capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert check(res), res["config"]
    assert res["layer_errors"] and all(e["block_rel_mse"] >= 0 for e in res["layer_errors"])
    assert res["method"]["name"] == (extra[1] if extra[0] == "--method" else "rptq")


@pytest.mark.parametrize("extra,message", [
    (["--method", "fptq", "--reorder", "12345"], "--reorder is used only with the reorder step"),
    (["--method", "rptq", "--smooth_alpha", "0.5"], "--smooth_alpha is used only with the smooth step"),
    (["--w_quantizer", "gptqt", "--wbits", "4"], "3- or 2-bit"),
    (["--transforms", "reorder,spin"], "unknown transform step"),
    (["--pack_weight"], "--save_quantized"),
    (["--abits_policy", "fptq"], "lae"),
    (["--w_clip", "1.5"], "(0, 1]"),
    (["--plot_layers", "7", "--act_dist_plot"], "outside the model"),
])
def test_bad_combinations_are_one_line_errors(model_dir, cache, tmp_path, capsys, extra, message):
    code, err = run(small(model_dir, cache, tmp_path / "out", *extra), capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "results.json").exists()


def saved_ppl(out):
    return json.loads((out / "results.json").read_text())["ppl"]["ptb"]


def reloaded_ppl(model_dir, cache, saved, out, capsys):
    """Evaluate a saved directory through the reference's --load; its PTB perplexity."""
    code, err = run([str(model_dir), "--load", str(saved), "--eval_ppl", "--ppl_datasets", "ptb", "--seqlen", "32",
                     "--limit", "2", "--cache_dir", cache, "--no_progress", "--output_path", str(out)], capsys)
    assert code == 0, err
    return saved_ppl(out)


def test_load_is_an_alias_of_load_quantized(model_dir, cache, tmp_path, capsys):
    saved = tmp_path / "saved"
    code, err = run(small(model_dir, cache, tmp_path / "a", "--save_quantized", str(saved)), capsys)
    assert code == 0, err
    assert reloaded_ppl(model_dir, cache, saved, tmp_path / "b", capsys) == saved_ppl(tmp_path / "a")


def test_gptqt_checkpoint_is_packed_binary_and_reloads_exactly(model_dir, cache, tmp_path, capsys):
    saved = tmp_path / "saved"
    code, err = run(small(model_dir, cache, tmp_path / "a", "--wbits", "3", "--abits", "16", "--w_quantizer", "gptqt",
                          "--reorder", "", "--save_quantized", str(saved)), capsys)
    assert code == 0, err
    manifest = json.loads((saved / "quant.json").read_text())
    kinds = {kind for layer in manifest["linears"] for entry in layer.values() for kind in [entry["kind"]]}
    assert kinds == {"binary"}, kinds
    assert reloaded_ppl(model_dir, cache, saved, tmp_path / "b", capsys) == saved_ppl(tmp_path / "a")
