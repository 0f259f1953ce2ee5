"""#20 items 2-4: a --load_quantized run is labelled by the checkpoint, not the command line; an
interrupted --save_quantized over an existing checkpoint leaves the old one; swapped block files and
an edited quant.json are refused. Each case ends correct or as one `error:` line with exit 2."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import main as cli
from eval.runs import row_label
from rptq.layer_store import LayerStore
from tests.helpers import save_tiny_opt_dir

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--R1_clusters", "4", "--R2_clusters", "2", "--R3_clusters", "2", "--R4_clusters", "4", "--R5_clusters", "4"]


def _eval(cache):
    return ["--eval_ppl", "--ppl_datasets", "ptb", "--seqlen", "32", "--limit", "2", "--cache_dir", str(cache),
            "--no_progress"]


def _calib(model_dir, cache):
    return [str(model_dir), "--calib_dataset", "ptb", "--nsamples", "2", *_eval(cache)]


def _main(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _results(out):
    return json.loads((Path(out) / "results.json").read_text())


def _one_error(code, err, needle):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny OPT dir, and two checkpoints saved by main.py with the results of the runs that saved them:
    SmoothQuant W8A8 (nsamples 2) and RPTQ W4A4."""
    root = tmp_path_factory.mktemp("made")
    model_dir = save_tiny_opt_dir(root / "m", seed=0, layers=2)
    cache = root / "cache"
    for name, flags in (("sq", ["--method", "smoothquant"]), ("w4", ["--wbits", "4", "--abits", "4", *SMALL])):
        assert cli.main([*_calib(model_dir, cache), *flags, "--save_quantized", str(root / name),
                         "--output_path", str(root / f"{name}-run")]) == 0
    return {"model": model_dir, "cache": cache, "sq": root / "sq", "w4": root / "w4",
            "sq_run": _results(root / "sq-run"), "w4_run": _results(root / "w4-run")}


def _copy(made, name, tmp_path):
    dest = tmp_path / name
    shutil.copytree(made[name], dest)
    return dest


def _load(made, ckpt, out, capsys, *extra, model=None):
    return _main([model or made["model"], "--load_quantized", ckpt, *_eval(made["cache"]), "--output_path", out,
                  *extra], capsys)


# ---------------------------------------------------------------- item 2: the checkpoint labels the run
def test_loaded_smoothquant_checkpoint_records_its_own_method_bits_and_calibration(made, tmp_path, capsys):
    code, _, err = _load(made, made["sq"], tmp_path / "out", capsys)
    assert code == 0, err
    res, saved = _results(tmp_path / "out"), made["sq_run"]
    assert res["method"]["name"] == "smoothquant" and res["method"]["transforms"] == ["smooth"]
    assert (res["config"]["wbits"], res["config"]["abits"]) == (8, 8) and row_label(res["config"]) == "W8A8"
    assert res["config"]["nsamples"] == 2 and res["config"]["calib_dataset"] == "ptb"
    assert res["model"] == str(made["model"])
    quant = json.loads((made["sq"] / "quant.json").read_text())
    assert res["loaded_from"]["path"] == str(made["sq"]) and res["loaded_from"]["id"] == quant["checkpoint_id"]
    assert quant["model_digest"] and quant["code_digest"] and quant["git"]
    for key in ("method", "transforms", "grid", "w_quantizer", "smoothquant", "seed", "wbits", "abits"):
        assert res["config"][key] == saved["config"][key], key
    assert res["bit_manifest"] == saved["bit_manifest"]
    assert res["ppl"] == saved["ppl"]  # bit-identical to the run that saved it


def test_matching_quantization_flags_and_eval_flags_are_free(made, tmp_path, capsys):
    code, _, err = _load(made, made["sq"], tmp_path / "out", capsys, "--method", "smoothquant", "--wbits", "8",
                         "--nsamples", "2", "--calib_dataset", "ptb", "--device", "cpu")
    assert code == 0, err
    assert _results(tmp_path / "out")["ppl"] == made["sq_run"]["ppl"]


@pytest.mark.parametrize("extra,needle", [
    (["--wbits", "4"], "--wbits sets wbits = 4, but checkpoint"),
    (["--method", "rptq"], "--method sets method"),
    (["--nsamples", "128"], "--nsamples sets nsamples = 128"),
    (["--calib_dataset", "wikitext2"], "--calib_dataset sets"),
    (["--seed", "7"], "--seed sets seed = 7"),
])
def test_flag_differing_from_the_checkpoint_is_one_error_line(made, tmp_path, capsys, extra, needle):
    code, _, err = _load(made, made["sq"], tmp_path / "out", capsys, *extra)
    _one_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_model_that_is_not_the_checkpoints_is_one_error_line(made, tmp_path, capsys):
    code, _, err = _load(made, made["sq"], tmp_path / "out", capsys, model="opt-125m")
    _one_error(code, err, f"MODEL opt-125m is not the model checkpoint {made['sq']} was quantized from")
    other = save_tiny_opt_dir(tmp_path / "other", seed=1, layers=2)  # a local model with other weights
    code, _, err = _load(made, made["sq"], tmp_path / "out", capsys, model=other)
    _one_error(code, err, "is not the model checkpoint")
    moved = shutil.copytree(made["model"], tmp_path / "moved")  # the same weights elsewhere: its digest matches
    code, _, err = _load(made, made["sq"], tmp_path / "out", capsys, model=moved)
    assert code == 0, err


# ---------------------------------------------------------------- item 3: a save replaces the old one whole
_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import main
from rptq.layer_store import LayerStore
save = LayerStore.save_block
def stop_after_first_block(self, index, block, checkpoint=None):
    save(self, index, block, checkpoint)
    if checkpoint is not None and index == 0:  # a layer boundary of the checkpoint write: wait to be killed
        os.kill(os.getpid(), signal.SIGSTOP)
LayerStore.save_block = stop_after_first_block
sys.exit(main.main(sys.argv[1:]))
"""


def test_save_killed_over_an_existing_checkpoint_leaves_the_old_one(made, tmp_path, capsys):
    ckpt = _copy(made, "sq", tmp_path)
    old_id = json.loads((ckpt / "quant.json").read_text())["checkpoint_id"]
    args = [*_calib(made["model"], made["cache"]), "--wbits", "4", "--abits", "4", *SMALL,
            "--save_quantized", str(ckpt)]
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT)), *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), child.stderr.read()
    partial = list(tmp_path.glob(".sq.saving-*"))
    assert len(partial) == 1 and (partial[0] / "block-00000.safetensors").is_file()
    assert not (partial[0] / "block-00001.safetensors").exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert json.loads((ckpt / "quant.json").read_text())["checkpoint_id"] == old_id
    code, _, err = _load(made, ckpt, tmp_path / "out", capsys)
    assert code == 0, err
    res = _results(tmp_path / "out")
    assert res["ppl"] == made["sq_run"]["ppl"] and res["loaded_from"]["id"] == old_id
    # the next save over it cleans the dead process's partial directory and replaces the checkpoint
    code, _, err = _main([*args, "--output_path", tmp_path / "again"], capsys)
    assert code == 0, err
    assert not list(tmp_path.glob(".sq.*")), list(tmp_path.iterdir())
    code, _, err = _load(made, ckpt, tmp_path / "out2", capsys)
    assert code == 0, err
    assert _results(tmp_path / "out2")["method"]["name"] == "rptq"
    assert _results(tmp_path / "out2")["ppl"] == _results(tmp_path / "again")["ppl"]


def test_save_failing_midway_leaves_the_old_checkpoint_and_no_debris(made, tmp_path, capsys, monkeypatch):
    ckpt = _copy(made, "sq", tmp_path)
    save = LayerStore.save_block

    def fail_at_second_block(self, index, block, checkpoint=None):
        if checkpoint is not None and index == 1:
            raise OSError("disk full")
        save(self, index, block, checkpoint)

    monkeypatch.setattr(LayerStore, "save_block", fail_at_second_block)
    with pytest.raises(OSError, match="disk full"):
        cli.main([*_calib(made["model"], made["cache"]), "--wbits", "4", "--abits", "4", *SMALL,
                  "--save_quantized", str(ckpt)])
    monkeypatch.undo()
    assert not list(tmp_path.glob(".sq.*"))
    code, _, err = _load(made, ckpt, tmp_path / "out", capsys)
    assert code == 0, err
    assert _results(tmp_path / "out")["ppl"] == made["sq_run"]["ppl"]


def test_save_killed_between_its_renames_points_to_the_old_checkpoint(made, tmp_path, capsys):
    """The one moment without DIR: the old checkpoint renamed aside, the new one not yet in place."""
    shutil.copytree(made["sq"], tmp_path / ".sq.replaced-0badf00d")
    code, _, err = _load(made, tmp_path / "sq", tmp_path / "out", capsys)
    _one_error(code, err, f"left the previous checkpoint at {tmp_path / '.sq.replaced-0badf00d'}: rename it back")


def test_out_of_core_save_stamps_the_copied_blocks_and_reloads_exactly(made, tmp_path, capsys):
    code, _, err = _main([*_calib(made["model"], made["cache"]), "--wbits", "4", "--abits", "4", *SMALL,
                          "--offload_dir", tmp_path / "off", "--save_quantized", tmp_path / "q",
                          "--output_path", tmp_path / "a"], capsys)
    assert code == 0, err
    code, _, err = _load(made, tmp_path / "q", tmp_path / "b", capsys)
    assert code == 0, err
    assert _results(tmp_path / "b")["ppl"] == _results(tmp_path / "a")["ppl"]


def test_save_over_a_directory_that_is_not_a_checkpoint_is_refused(made, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "paper.tex").write_text("mine")
    code, _, err = _main([*_calib(made["model"], made["cache"]), "--save_quantized", tmp_path / "notes"], capsys)
    _one_error(code, err, "is not a checkpoint directory")
    assert (tmp_path / "notes" / "paper.tex").read_text() == "mine"


# ---------------------------------------------------------------- item 4: integrity
def _edit_json(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


def _edit_block_meta(path, **update):
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta.update({k: json.dumps(v) for k, v in update.items()})
    save_file(load_file(path), path, metadata=meta)


def _swap_blocks(d):
    a, b = d / "block-00000.safetensors", d / "block-00001.safetensors"
    a.rename(d / "tmp")
    b.rename(a)
    (d / "tmp").rename(b)


def _weights_to_8(data):
    for point, entry in data["bit_manifest"].items():
        if point.startswith("weight:"):
            entry["bits"] = 8


CORRUPTIONS = {
    "swapped blocks": (_swap_blocks, "block-00000.safetensors holds layer 1, not layer 0"),
    "foreign block": (lambda d: _edit_block_meta(d / "block-00001.safetensors", checkpoint="0" * 32),
                      "block-00001.safetensors belongs to checkpoint 00000000"),
    "manifest weights 8 bits": (lambda d: _edit_json(d / "quant.json", _weights_to_8),
                                "bit_manifest says weight:self_attn.q_proj is 8 bits, block-00000.safetensors "
                                "holds 4-bit codes"),
    "manifest activation 8 bits": (lambda d: _edit_json(d / "quant.json", lambda j: j["bit_manifest"]["q"].update(
        bits=8)), "bit_manifest says q is 8 bits, block-00000.safetensors holds 4 bits"),
    "manifest granularity": (lambda d: _edit_json(d / "quant.json", lambda j: j["bit_manifest"]["weight:fc1"].update(
        granularity="row")), "weight:fc1 is row, block-00000.safetensors holds 4 groups per row"),
    "config wbits 8": (lambda d: _edit_json(d / "quant.json", lambda j: j["config"].update(wbits=8)),
                       "its config implies"),
    "old checkpoint": (lambda d: _edit_json(d / "quant.json", lambda j: j.pop("checkpoint_id")),
                       "saved by an older version that recorded no checkpoint id"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_tampered_checkpoint_is_one_error_line(made, tmp_path, capsys, case):
    corrupt, needle = CORRUPTIONS[case]
    ckpt = _copy(made, "w4", tmp_path)
    corrupt(ckpt)
    code, _, err = _load(made, ckpt, tmp_path / "out", capsys)
    _one_error(code, err, needle)
    assert f"--load_quantized {ckpt}" in err and not (tmp_path / "out").exists()


def test_other_code_digest_warns_once_and_still_loads_exactly(made, tmp_path, capsys):
    ckpt = _copy(made, "w4", tmp_path)
    _edit_json(ckpt / "quant.json", lambda j: j.update(code_digest="0123456789abcdef"))
    code, out, err = _load(made, ckpt, tmp_path / "out", capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0123456789abcdef" in warnings[0]
    assert _results(tmp_path / "out")["ppl"] == made["w4_run"]["ppl"]
