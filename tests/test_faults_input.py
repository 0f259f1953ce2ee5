"""Issue #20, bad input: every case ends as one `error:` line and exit code 2, before the step that would
have wasted time (the model load, or calibration), with nothing written; a full disk loses no numbers.

Runs go through main.main(argv) in this process (it returns the exit code; the error line is on stderr), so a
step that must not be reached can be replaced by one that fails the test: a late check then gives a different
error. One case runs main.py in a subprocess to show the same end to end.

Unwritable places: the tests run as root in CI, where chmod 0o500 stops nothing. They use /proc (procfs
creates no files for anyone, root included: ENOENT) and a path under a regular file (ENOTDIR). A full disk is
/dev/full, whose writes fail with ENOSPC for root too, patched in place of the results/checkpoint writer.
"""
import errno
import subprocess
import sys
from pathlib import Path

import pytest

import main as cli
from tests.helpers import save_tiny_opt_dir

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--nsamples", "2", "--seqlen", "64", "--calib_dataset", "ptb", "--no_progress"]
UNWRITABLE = "/proc/rptq-faults-input"  # procfs: no file can be created there, not even by root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_opt_dir(tmp_path_factory.mktemp("tiny-opt"), seed=0, max_pos=256)  # hidden 64, head_dim 16


@pytest.fixture
def texts(tmp_path):
    """A directory, a binary file, a Latin-1 file, a text shorter than one window, a regular file."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("only a few words here.")
    (tmp_path / "afile").write_text("x")
    return tmp_path


def fail_if_called(what):
    def stop(*_args, **_kwargs):
        raise AssertionError(f"{what} was reached: the check came too late")
    return stop


@pytest.fixture
def no_load(monkeypatch):
    """The model must not be loaded (the check belongs before it)."""
    import rptq.runner

    monkeypatch.setattr(rptq.runner, "load", fail_if_called("the model load"))


@pytest.fixture
def no_calibration(monkeypatch):
    import rptq.runner

    monkeypatch.setattr(rptq.runner, "calibrate", fail_if_called("calibration"))


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of main.main(args)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code, err, expected):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and expected in lines[0], lines[0]


# Item 6 and 9: refused before the model loads. {model}, {tmp}: the fixtures' paths.
BEFORE_LOAD = {
    "output path unwritable": (["--output_path", UNWRITABLE], "not writable"),
    "output path under a file": (["--output_path", "{tmp}/afile/sub"], "afile is a file"),
    "save path unwritable": (["--save_quantized", UNWRITABLE], "--save_quantized /proc/rptq-faults-input is not"),
    "offload path unwritable": (["--offload_dir", UNWRITABLE], "--offload_dir /proc/rptq-faults-input is not"),
    "cache dir is a file": (["--cache_dir", "{tmp}/afile"], "--cache_dir {tmp}/afile is a file"),
    "cache dir unwritable": (["--cache_dir", UNWRITABLE], "--cache_dir /proc/rptq-faults-input is not writable"),
    "ppl file is a directory": (["--eval_ppl", "--ppl_datasets", "file:{tmp}/adir"], "is a directory"),
    "calib file is a directory": (["--calib_dataset", "file:{tmp}/adir"], "is a directory"),
    "ppl file binary": (["--eval_ppl", "--ppl_datasets", "file:{tmp}/binary.bin"], "is not UTF-8 text"),
    "calib file latin-1": (["--calib_dataset", "file:{tmp}/latin1.txt"], "is not UTF-8 text (byte 0xe9"),
    "calibration mix offline": (["--calib_dataset", "mix"], "needs the Hugging Face hub"),
    "calibration mix offline, GGUF model": (["smollm2-135m", "--calib_dataset", "mix"], "needs the Hugging Face hub"),
    "seed negative": (["--seed", "-1"], "--seed must be in 0 .. 2^32-1"),
    "seed too large": (["--seed", str(2**32)], "--seed must be in 0 .. 2^32-1"),
    "R1 clusters above channels": (["--R1_clusters", "65"], "--R1_clusters 65 exceeds the model's 64 channels"),
    "R2 clusters above head_dim": (["--R2_clusters", "100"], "exceeds the model's 16 channels per head at R2"),
    "R3 clusters above head_dim": (["--R3_clusters", "17"], "exceeds the model's 16 channels per head at R3"),
    "R5 clusters above fc2 width": (["--R5_clusters", "129"], "exceeds the model's 128 channels at R5"),
    "clusters of a point not reordered": (["--reorder", "1", "--R2_clusters", "2"], "is used only with R2 in --reorder"),
    "seqlen above positions": (["--seqlen", "4096"], "exceeds the model's 256 positions"),
    "rotation block not a power of 2": (["--method", "duquant", "--rotation_block", "3"], "power of two such as 2 (got 3)"),
    "rotation block without rotate": (["--rotation_block", "64"], "--rotation_block is used only with the rotate"),
    "rotation steps without rotate": (["--rotation_steps", "8"], "--rotation_steps is used only with the rotate"),
    "inter_bits 12": (["--wbits", "3", "--w_quantizer", "gptqt", "--inter_bits", "12"], "wbits + 1 .. 6 = 4 .. 6"),
    "inter_bits 7": (["--wbits", "3", "--w_quantizer", "gptqt", "--inter_bits", "7"], "(got 7)"),
    "inter_bits not above wbits": (["--wbits", "3", "--w_quantizer", "gptqt", "--inter_bits", "3"], "(got 3)"),
    "inter_bits without gptqt": (["--inter_bits", "5"], "--inter_bits is used only with --w_quantizer gptqt"),
    "gptqt_variant without gptqt": (["--gptqt_variant", "A"], "--gptqt_variant is used only with --w_quantizer"),
    "act_order without gptq": (["--act_order", "--w_quantizer", "rtn"], "--act_order orders GPTQ's columns"),
    "act_order with fp weights": (["--act_order", "--wbits", "16"], "without a GPTQ weight sweep"),
    "ppl_datasets without eval_ppl": (["--ppl_datasets", "ptb"], "add --eval_ppl"),
    "fptq v0 above v1": (["--method", "fptq", "--fptq_v0", "200", "--fptq_v1", "10"], "0 <= v0 <= v1 (got 200.0, 10.0)"),
    "fptq v0 negative": (["--method", "fptq", "--fptq_v0", "-1"], "0 <= v0 <= v1"),
    "fptq thresholds without lae": (["--fptq_v0", "10"], "--fptq_v0 is used only with the lae step"),
    "kv_bits without fptq policy": (["--kv_bits", "4"], "--kv_bits is used only with --abits_policy fptq"),
    "save into the model's directory": (["--save_quantized", "{model}"], "is the model's own directory"),
    "tokenizer files missing": (["{notok}"], "has no tokenizer files"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_LOAD))
def test_refused_before_the_model_loads(case, model_dir, texts, no_load, tmp_path, capsys):
    args, expected = BEFORE_LOAD[case]
    notok = tmp_path / "notok"
    if "{notok}" in args:  # a model directory without tokenizer files
        notok.mkdir()
        for f in model_dir.iterdir():
            if f.name in ("config.json", "model.safetensors"):
                (notok / f.name).symlink_to(f)
    fmt = dict(model=model_dir, tmp=texts, notok=notok)
    args = [a.format(**fmt) for a in args]
    model = [] if not args[0].startswith("--") else [str(model_dir)]  # the case names its own model
    out = tmp_path / "out"
    extra = [] if "--output_path" in args else ["--output_path", str(out)]
    before = set(texts.rglob("*"))
    code, _, err = run_cli(model + QUICK + args + extra, capsys)
    assert_refused(code, err, expected.format(**fmt))
    assert not out.exists() and set(texts.rglob("*")) == before  # nothing written, probe files removed


SHORT = {
    "ppl file shorter than a window": ["--eval_ppl", "--ppl_datasets", "file:{tmp}/short.txt"],
    "calib file shorter than a window": ["--calib_dataset", "file:{tmp}/short.txt"],
}


@pytest.mark.parametrize("case", sorted(SHORT))
def test_short_text_refused_before_calibration(case, model_dir, texts, no_calibration, tmp_path, capsys):
    """Needs the tokenizer, so after the load but before calibration (today: after calibration and eval)."""
    args = [a.format(tmp=texts) for a in SHORT[case]]
    out = tmp_path / "out"
    code, _, err = run_cli([model_dir, *QUICK, *args, "--output_path", out, "--cache_dir", tmp_path / "cache"], capsys)
    assert_refused(code, err, "seqlen=64")
    assert not out.exists()


def test_limits_are_inclusive(model_dir, texts, no_calibration, tmp_path, capsys):
    """Exactly as many clusters as channels is accepted (reaches calibration, here replaced by a stop)."""
    args = [model_dir, *QUICK, "--R1_clusters", "64", "--R2_clusters", "16", "--R5_clusters", "128"]
    with pytest.raises(AssertionError, match="calibration was reached"):
        run_cli(args, capsys)


def test_bad_seed_in_a_subprocess_is_one_line(model_dir, tmp_path):
    """End to end: the process exits 2 with one line and no traceback (today an sklearn traceback)."""
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), str(model_dir), "--seed", "-1", *QUICK,
                           "--output_path", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                               "HF_DATASETS_OFFLINE": "1"})
    assert_refused(proc.returncode, proc.stderr, "random_state range (got -1)")
    assert not (tmp_path / "out").exists()


def write_to_dev_full(_dest, text, *_args, **_kwargs):
    """What a full disk does to a write: ENOSPC (on flush/close), for root too."""
    with open("/dev/full", "w") as handle:
        handle.write(text)


def test_disk_full_on_results_prints_the_numbers_first(model_dir, monkeypatch, tmp_path, capsys):
    import eval.report

    monkeypatch.setattr(eval.report, "atomic_write_text", write_to_dev_full)
    out = tmp_path / "out"
    code, stdout, err = run_cli([model_dir, "--wbits", "16", "--abits", "16", "--eval_ppl", "--ppl_datasets", "ptb",
                                 "--limit", "2", "--no_resume", "--output_path", out, *QUICK], capsys)
    assert_refused(code, err, f"could not write {out / 'results.json'}: No space left on device (ENOSPC)")
    assert "ppl ptb" in stdout  # the numbers survive the failed write
    assert not (out / "results.json").exists()


def test_disk_full_on_checkpoint_is_one_line(model_dir, monkeypatch, tmp_path, capsys):
    import rptq.checkpoint

    monkeypatch.setattr(rptq.checkpoint, "atomic_write_text", write_to_dev_full)
    save = tmp_path / "q"
    code, _, err = run_cli([model_dir, "--wbits", "4", "--abits", "16", "--w_quantizer", "rtn", "--R1_clusters", "4",
                            "--R4_clusters", "4", "--R5_clusters", "4", "--save_quantized", save, *QUICK], capsys)
    assert_refused(code, err, f"could not write {save}: No space left on device (ENOSPC); free space or pass "
                              "another --save_quantized")
    assert not (save / "quant.json").exists()  # its absence marks the save incomplete


def test_write_errors_pass_other_os_errors_through():
    """Only the user's disk problems become one line; anything else stays a bug with its traceback."""
    from common.errors import UserError
    from common.atomic import write_errors

    with pytest.raises(UserError, match="read-only"):
        with write_errors("/x"):
            raise OSError(errno.EROFS, "read-only file system")
    with pytest.raises(OSError):
        with write_errors("/x"):
            raise OSError(errno.EBADF, "bad file descriptor")


def test_full_disk_under_the_calibration_state_and_token_cache_is_one_line(tmp_path, monkeypatch):
    """The resume store's and the token cache's writes end as one line naming their place (the state
    written so far stays whole: the atomic writers never leave half a file)."""
    import torch

    from common.errors import UserError
    from eval import cache
    from rptq import layer_store

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layer_store, "atomic_save", full)
    store = layer_store.LayerStore(tmp_path / "state")
    with pytest.raises(UserError, match=f"could not write {tmp_path / 'state'}: No space left on device"):
        store.save_progress(1, torch.zeros(2, 3), {"model": "m"})
    assert store.progress() is None
    monkeypatch.setattr(cache, "atomic_write", full)
    with pytest.raises(UserError, match="ENOSPC.*--cache_dir"):
        cache.cached_tensor(tmp_path / "cache", {"what": "t"}, lambda: torch.zeros(3))


@pytest.mark.parametrize("flags", [["--no_permute"], ["--outlier_index", "paper"], ["--act_clip", "0.8"]])
def test_rotation_flags_without_their_step_are_refused(flags, capsys):
    """DuQuant's zigzag, outlier rule and activation clipping do nothing under --method rptq: refused."""
    assert cli.main(["tiny", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flags[0]} is used only with")
