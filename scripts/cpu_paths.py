"""How far one SmolLM2 W4A4 run moves between CPU code paths: the same command (RPTQ's defaults on the peer's
windows: 32 x 512 PTB-train calibration windows, seed 2, the first 16 PTB-validation windows of 512) with this
machine's kernels and with AVX2-only ones (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2), which is what a
machine without AVX-512 runs. k-means and GPTQ turn the last-bit differences of the forward into different
clusters and roundings, so this is the spread a figure carries from one machine to another, beside its spread over
calibration seeds.

Each run is ``main.py`` in a subprocess into OUT/<path>/; a run whose results.json exists with the same command and
the checkout's code digest is kept. About 15 minutes on 2 idle cores.

    .venv/bin/python scripts/cpu_paths.py [--out_dir out/cpu-paths] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.provenance import code_digest  # noqa: E402
from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402

COMMAND = ["main.py", "smollm2-135m", "--wbits", "4", "--abits", "4", "--eval_ppl", "--ppl_datasets", "ptb",
           "--calib_dataset", "ptb", "--nsamples", "32", "--seqlen", "512", "--limit", "16", "--seed", "2",
           "--no_progress", "--no_resume"]
PATHS = (("default", {}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}))


def run(out: Path, name: str, env: dict, digest: str) -> dict:
    """results.json of one path, made now unless stored with the same command and code digest."""
    folder = out / name
    stamp = " ".join([*(f"{k}={v}" for k, v in env.items()), ".venv/bin/python", *map(shlex.quote, COMMAND)])
    results, command = folder / "results.json", folder / "command.txt"
    if results.is_file() and command.is_file() and command.read_text().split("\n")[:2] == [stamp, digest]:
        return json.loads(results.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, *COMMAND, "--output_path", str(folder)], cwd=ROOT, check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    command.write_text(f"{stamp}\n{digest}\n")
    return json.loads(results.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", default="out/cpu-paths")
    add_out_flag(ap, "docs/bench/cpu_paths.txt")
    args = ap.parse_args()
    digest = code_digest()
    with tee_stdout(out_argument()):
        results = {name: run(Path(args.out_dir), name, env, digest) for name, env in PATHS}
        print("SmolLM2-135M W4A4, RPTQ defaults; 32 x 512 PTB-train calibration windows, seed 2; first 16 PTB-validation "
              "windows of 512")
        print(f"{'CPU path':10s} {'ptb ppl':>10s} {'layer 0 block rel MSE':>22s} {'last layer':>12s}")
        for name, r in results.items():
            errors = r["layer_errors"]
            print(f"{name:10s} {r['ppl']['ptb']:10.4f} {errors[0]['block_rel_mse']:22.9f} "
                  f"{errors[-1]['block_rel_mse']:12.6f}")
        a, b = (results[name]["ppl"]["ptb"] for name, _ in PATHS)
        print(f"avx2 / default = {b / a:.4f} ({(b / a - 1) * 100:+.2f}%)")
        print(f"code digest of the runs: {digest}")


if __name__ == "__main__":
    main()
