"""Calibration cost of DuQuant with GPTQ weights against DuQuant with RTN weights.

Both run back to back in one process on the same OPT-shaped model (random weights, injected
outliers; nothing from the hub), with the ``--method duquant`` preset and only --w_quantizer
changed. Prints each run's phases (stats / transforms / weights / output, from the
CalibrationReport summary) and the GPTQ/RTN ratio of the totals; target: within 2x.

    .venv/bin/python scripts/bench_duquant_gptq.py [--windows 4 --seqlen 128 --layers 2 --digest]
    .venv/bin/python scripts/bench_duquant_gptq.py --profile gptq   # cProfile of the GPTQ run
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import main as cli  # noqa: E402
from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from models.synthetic import OPT_125M_SHAPE, inject_opt_outliers, random_opt  # noqa: E402
from rptq import methods  # noqa: E402
from rptq.flags import quant_config  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402
from scripts.bench_calibration import _digest  # noqa: E402  (the same digest: weights and per-layer errors)

TARGET_RATIO = 2.0  # DuQuant with GPTQ weights within 2x of DuQuant with RTN
PHASES = (("stats pass (FP)", "stats_s"), ("transforms", "transform_s"), ("weights", "weights_s"),
          ("output pass", "output_s"), ("total", "total_s"))


def _run(w_quantizer: str, args, profile: bool):
    shape = dict(OPT_125M_SHAPE, num_hidden_layers=args.layers, max_position_embeddings=2048)
    model = inject_opt_outliers(random_opt(seed=0, **shape), seed=1)
    windows = torch.randint(4, 50000, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = quant_config(cli.build_parser().parse_args(["synthetic", "--method", "duquant",
                                                       "--w_quantizer", w_quantizer]))
    methods.modules()  # method imports once per process, outside the timing
    import sklearn.cluster  # noqa: F401
    prof = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if prof:
        prof.enable()
    report = quantize_model(model, adapter_for(model.config), windows, cfg, progress=False)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    wall = time.perf_counter() - start
    digest = None
    if args.digest:
        digest = (_digest(model, report), [round(e["block_rel_mse"], 6) for e in report.layer_errors()])
    return report.summary(), wall, digest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--digest", action="store_true", help="also print a SHA-256 of each run's weights and errors")
    ap.add_argument("--profile", choices=("rtn", "gptq"), default=None, help="cProfile that run (slows it)")
    add_out_flag(ap, "duquant_gptq.txt")
    args = ap.parse_args()

    results = {q: _run(q, args, args.profile == q) for q in ("rtn", "gptq")}
    print(f"model: OPT-125m shape, {args.layers} layers, random weights + injected outliers; {args.windows} "
          f"windows x {args.seqlen} tokens; --method duquant (W4A4), torch threads {torch.get_num_threads()}")
    print(f"{'phase':<18} {'rtn':>9} {'gptq':>9}")
    for label, key in PHASES:
        print(f"{label:<18} {results['rtn'][0][key]:8.2f}s {results['gptq'][0][key]:8.2f}s")
    ratio = results["gptq"][0]["total_s"] / results["rtn"][0]["total_s"]
    print(f"gptq / rtn calibration = {ratio:.2f}x; target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}")
    if args.digest:
        for q in ("rtn", "gptq"):
            print(f"digest {q} {results[q][2][0]}; block output rel. MSE per layer {results[q][2][1]}")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (shared machine: compare runs taken back to back)")


if __name__ == "__main__":
    with tee_stdout(out_argument()):  # --out: the same report in a file
        main()
