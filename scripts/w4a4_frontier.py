"""The W4A4 frontier on the peer's windows: SmolLM2-135M, 32 x 512 PTB-train calibration windows, the first 16
PTB-validation windows of 512 (the windows llm-compressor was run on), perplexity against FP16 with calibration
seconds, for FlatQuant and the learned-clipping rows beside DuQuant and QuaRot; the best configuration over three
calibration seeds against the 1.25x FP16 goal.

Each run is ``main.py`` in a subprocess into OUT/<run>/ (results.json and command.txt); a run whose results.json
exists with the same command and the checkout's code digest is kept, so an interrupted generation resumes.
Hours on a 2-core CPU (FlatQuant's 8-epoch rows take about 20 minutes each).

    .venv/bin/python scripts/w4a4_frontier.py [--out_dir out/w4a4-frontier] [--only RUN,...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.provenance import code_digest  # noqa: E402
from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402

WINDOWS = ["--eval_ppl", "--ppl_datasets", "ptb", "--calib_dataset", "ptb", "--nsamples", "32", "--seqlen", "512",
           "--limit", "16"]
BEST = ["--method", "flatquant", "--flat_epochs", "8", "--w_quantizer", "gptq", "--grid", "full", "--a_asym",
        "--w_group_size", "64"]
# (run, flags, what it is); a run named <x>-s<N> calibrates with seed N (else 2)
RUNS = (
    ("fp16", ["--wbits", "16", "--abits", "16"], "FP16"),
    ("duquant-gptq", ["--method", "duquant", "--w_quantizer", "gptq", "--rotation_steps", "64"],
     "DuQuant + GPTQ (64 greedy steps)"),
    ("duquant-gptq-lwc", ["--method", "duquant", "--w_quantizer", "gptq", "--rotation_steps", "64", "--w_clip",
                          "learned"], "DuQuant + GPTQ, learned weight clipping"),
    ("quarot", ["--method", "quarot"], "QuaRot (GPTQ, clipping search)"),
    ("quarot-lwc", ["--method", "quarot", "--w_clip", "learned"], "QuaRot, learned weight clipping"),
    ("flatquant-gptq-e4", ["--method", "flatquant", "--flat_epochs", "4", "--w_quantizer", "gptq"],
     "FlatQuant + GPTQ, 4 epochs (the paper's symmetric grids)"),
    ("flatquant-gptq-asym-e4", ["--method", "flatquant", "--flat_epochs", "4", "--w_quantizer", "gptq", "--grid",
                                "full", "--a_asym"], "... + asymmetric weights and activations"),
    ("flatquant-gptq-asym-g64-e4", ["--method", "flatquant", "--flat_epochs", "4", "--w_quantizer", "gptq", "--grid",
                                    "full", "--a_asym", "--w_group_size", "64"], "... + weight groups of 64"),
    ("flatquant-best", BEST, "... + 8 epochs (best)"),
    ("flatquant-best-s3", BEST, "best, seed 3"),
    ("flatquant-best-s4", BEST, "best, seed 4"),
)
GOAL = 1.25


def _seed(run: str) -> str:
    tail = run.rsplit("-s", 1)
    return tail[1] if len(tail) == 2 and tail[1].isdigit() else "2"


def command(run: str, flags: list[str]) -> list[str]:
    return ["main.py", "smollm2-135m", *flags, *WINDOWS, "--seed", _seed(run), "--no_progress", "--no_resume"]


def ensure(run: str, flags: list[str], out_dir: Path) -> dict | None:
    """The run's results.json, made now unless a current one is there (same command, same code digest)."""
    where = out_dir / run
    cmd = command(run, flags)
    text = shlex.join(cmd)
    results = where / "results.json"
    if results.is_file() and (where / "command.txt").is_file() and (where / "command.txt").read_text().strip() == text:
        data = json.loads(results.read_text())
        if data.get("versions", {}).get("code_digest") == code_digest():
            return data
    where.mkdir(parents=True, exist_ok=True)
    (where / "command.txt").write_text(text + "\n")
    done = subprocess.run([sys.executable, *cmd, "--output_path", str(where)], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        print(f"{run}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        return None
    return json.loads(results.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", default="out/w4a4-frontier")
    ap.add_argument("--only", default=None, help="comma list of runs to make (the table shows every stored one)")
    add_out_flag(ap, "w4a4_frontier.txt")
    args = ap.parse_args()
    out_dir = ROOT / args.out_dir
    only = set(args.only.split(",")) if args.only else None
    results = {}
    for run, flags, _ in RUNS:
        if only is None or run in only:
            results[run] = ensure(run, flags, out_dir)
        elif (out_dir / run / "results.json").is_file():
            results[run] = json.loads((out_dir / run / "results.json").read_text())
    fp = (results.get("fp16") or {}).get("ppl", {}).get("ptb")
    print("SmolLM2-135M (weights dequantized from GGUF Q4_1), W4A4 with KV4 unless noted; calibration 32 x 512 "
          "PTB-train windows, seed 2 unless noted; perplexity on the first 16 PTB-validation windows of 512")
    print(f"{'run':28s} {'ptb ppl':>9s} {'x FP16':>7s} {'calib s':>8s}  what")
    for run, _, what in RUNS:
        data = results.get(run)
        if not data:
            print(f"{run:28s} {'not run':>9s}")
            continue
        ppl = data["ppl"]["ptb"]
        ratio = f"{ppl / fp:7.3f}" if fp else "      ?"
        print(f"{run:28s} {ppl:9.3f} {ratio} {data['timing']['calibration_s']:8.0f}  {what}")
    best = [results[r]["ppl"]["ptb"] for r in ("flatquant-best", "flatquant-best-s3", "flatquant-best-s4")
            if results.get(r)]
    if fp and len(best) > 1:
        m, s = mean(best), stdev(best)
        verdict = "met" if m / fp <= GOAL else "missed"
        print(f"best configuration over {len(best)} seeds: {m:.3f} +- {s:.3f} (sample std) = {m / fp:.3f} x FP16; "
              f"goal <= {GOAL} x: {verdict} (worst seed {max(best) / fp:.3f} x)")
    digests = sorted({d["versions"]["code_digest"] for d in results.values() if d})
    print(f"code digest of the runs: {', '.join(digests)}")


if __name__ == "__main__":
    with tee_stdout(out_argument()):
        main()
