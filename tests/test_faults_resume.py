"""#20, interrupted and resumed calibration: Ctrl-C at a layer boundary is one line and exit code 130; a
rerun over replaced weights is refused naming them (never a stale perplexity); a rerun over the same
weights resumes and its results.json equals an uninterrupted run's, every layer included."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.provenance import file_digest
from rptq.run_calibration import PAUSE_ENV, differences
from tests.helpers import save_tiny_opt_dir

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 4
FLAGS = ["--wbits", "4", "--abits", "4", "--nsamples", "2", "--seqlen", "64", "--calib_dataset", "ptb", "--eval_ppl",
         "--ppl_datasets", "ptb", "--limit", "2", "--R1_clusters", "4", "--R4_clusters", "4", "--R5_clusters", "4",
         "--no_progress"]


def _env(tmp: Path, **extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RPTQ_CACHE_DIR": str(tmp / "digests")}
    env.pop(PAUSE_ENV, None)
    env.update(extra)
    return env


def _command(model: Path, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), str(model), *FLAGS, "--cache_dir", str(tmp / "cache"), *extra]


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)


def _interrupt_after(layer: int, cmd: list[str], tmp: Path, sig=signal.SIGINT) -> tuple[int, str, str]:
    """Run ``cmd`` until it has saved ``layer``'s state (the test-only pause), then send ``sig``."""
    # SIGINT back to its default in the child: a shell running the suite in the background (CI
    # runners, `make test &`) starts it ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp, **{PAUSE_ENV: str(layer)}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(600, proc.kill)  # a child that never reaches the pause fails, not hangs
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"test: paused after layer {layer}"):
                proc.send_signal(sig)
                break
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(seen) + out, err


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_file_digest_cache_rehashes_when_size_or_mtime_changes(tmp_path):
    cache = tmp_path / "digests.json"
    data = tmp_path / "w.bin"
    data.write_bytes(b"a" * 64)
    first = file_digest(data, cache)
    known = json.loads(cache.read_text())
    (key,) = known
    known[key] = "planted"  # proves the cache is read while nothing changed
    cache.write_text(json.dumps(known))
    assert file_digest(data, cache) == "planted"

    stat = data.stat()
    data.write_bytes(b"b" * 64)  # same size, mtime set back: only the ctime tells
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = file_digest(data, cache)
    assert second not in (first, "planted")

    data.write_bytes(b"b" * 65)  # size
    assert file_digest(data, cache) not in (second, "planted")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # mtime alone: hashed again, same bytes
    assert file_digest(data, cache) == file_digest(data, tmp_path / "fresh.json")
    assert len(json.loads(cache.read_text())) == 1  # stale entries of the path are dropped


def test_mismatch_names_the_part_that_differs():
    state = {"model": {"model.safetensors": "1", "vocab.json": "2"}, "code": "c", "settings": {"wbits": 4, "seed": 2},
             "windows": "w"}
    assert differences(state, state) == []
    weights = differences(state, {**state, "model": {"model.safetensors": "9", "vocab.json": "2"}})
    assert weights == ["model weights/tokenizer files (model.safetensors)"]
    assert "quantization code" in differences(state, {**state, "code": "d"})[0]
    assert differences(state, {**state, "settings": {"wbits": 3, "seed": 2}}) == ["settings (wbits)"]
    assert "calibration windows" in differences(state, {**state, "windows": "x"})[0]
    assert "older version" in differences("0123abcd", state)[0]  # a state from before the parts were kept


def test_interrupt_then_replaced_weights_refused_and_same_weights_resume_identically(tmp_path):
    model = save_tiny_opt_dir(tmp_path / "m", seed=0, layers=LAYERS)
    resumed, stale, clean = tmp_path / "resumed", tmp_path / "stale", tmp_path / "clean"

    rc, out, err = _interrupt_after(1, _command(model, tmp_path, "--output_path", str(resumed)), tmp_path)
    assert rc == 130, err
    assert err.strip().splitlines() == [f"interrupted after 2 of {LAYERS} layers were calibrated (kept in "
                                        f"{resumed / 'calibration_state'}); rerun the same command to resume"]
    assert not (resumed / "results.json").exists()
    first_attempt_s = json.loads((resumed / "calibration_state" / "state.json").read_text())["calibration_s"]
    shutil.copytree(resumed, stale)  # the same interrupted state, for the replaced-weights rerun below

    # (b) same weights: resumes at layer 2 and ends as the uninterrupted run does
    done = _run(_command(model, tmp_path, "--output_path", str(resumed)), tmp_path)
    assert done.returncode == 0, done.stderr
    assert _run(_command(model, tmp_path, "--output_path", str(clean)), tmp_path).returncode == 0
    a, b = _results(clean), _results(resumed)
    assert b["ppl"] == a["ppl"]  # bit for bit
    assert b["layer_errors"] == a["layer_errors"] and b["decisions"] == a["decisions"]
    assert [e["layer"] for e in b["layer_errors"]] == list(range(LAYERS))
    assert b["bit_manifest"] == a["bit_manifest"]
    assert a["resumed_from_layer"] is None and b["resumed_from_layer"] == 2
    assert b["timing"]["calibration_s"] >= first_attempt_s > 0
    assert not (resumed / "calibration_state").exists()

    # (a) the weights replaced in the same directory: refused in one line naming them, nothing reported
    save_tiny_opt_dir(model, seed=1, layers=LAYERS)
    refused = _run(_command(model, tmp_path, "--output_path", str(stale)), tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: ") and "model weights/tokenizer files (model.safetensors)" in line
    assert f"delete {stale / 'calibration_state'}" in line and "--no_resume" in line
    assert "ppl" not in refused.stdout and not (stale / "results.json").exists()
    assert (stale / "calibration_state" / "state.json").is_file()  # refusing deletes nothing


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_without_resume_state_says_nothing_was_kept(tmp_path, sig, code):
    model = save_tiny_opt_dir(tmp_path / "m", seed=0, layers=LAYERS)
    out = tmp_path / "out"
    rc, _, err = _interrupt_after(0, _command(model, tmp_path, "--output_path", str(out), "--no_resume"), tmp_path,
                                  sig)
    assert rc == code, err
    assert err.strip().splitlines() == [f"interrupted after 1 of {LAYERS} layers were calibrated; nothing was kept "
                                        "(--no_resume), so a rerun calibrates from the start"]
    assert not (out / "calibration_state").exists()
