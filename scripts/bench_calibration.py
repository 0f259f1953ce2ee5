"""Calibration cost of RPTQ on an OPT-125m-shaped model (random weights, injected outliers).

Prints passes per layer, where the time goes (stats / k-means / GPTQ / output), each as a
ratio to one FP forward over the same windows (and that forward's decoder-only share: the part
the two calibration passes repeat), the total's ratio against the target, and peak RSS.

    .venv/bin/python scripts/bench_calibration.py [--windows 16 --seqlen 512 --layers 12 --digest]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402
from eval.report import peak_rss_mb  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from models.synthetic import OPT_125M_SHAPE, inject_opt_outliers, random_opt  # noqa: E402
from rptq import methods  # noqa: E402
from rptq.config import QuantConfig  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402

TARGET_RATIO = 2.5  # calibration within 2.5 FP forwards of the calibration set (RPTQ's defaults: 3 passes per layer)


def _digest(model, report) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    h.update(repr(report.layer_errors()).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=OPT_125M_SHAPE["num_hidden_layers"])
    ap.add_argument("--w_quantizer", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--digest", action="store_true",
                    help="also print a SHA-256 of the quantized weights and per-layer errors: a speed change "
                         "must leave it unchanged")
    add_out_flag(ap, "calibration.txt")
    args = ap.parse_args()

    shape = dict(OPT_125M_SHAPE, num_hidden_layers=args.layers, max_position_embeddings=2048)
    model = inject_opt_outliers(random_opt(seed=0, **shape), seed=1)
    windows = torch.randint(4, 50000, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))

    cfg = QuantConfig(wbits=4, abits=4, w_quantizer=args.w_quantizer)
    # Import the method's modules (k-means: scikit-learn) before timing, as the FP forward's were:
    # once per process, not per calibration (otherwise layer 0's transforms carry it).
    start = time.perf_counter()
    methods.modules()  # every method module, and what k-means needs
    import sklearn.cluster  # noqa: F401
    import_s = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0), use_cache=False)
    fp_forward_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():  # the decoder layers' share: what each calibration pass repeats per layer
        for window in windows:
            model.model.decoder(window.unsqueeze(0), use_cache=False)
    decoder_s = time.perf_counter() - start

    report = quantize_model(model, adapter_for(model.config), windows, cfg, progress=False)
    s = report.summary()
    rss_mb = peak_rss_mb()

    print(f"model: OPT-125m shape, {args.layers} layers, random weights + injected outliers; "
          f"{args.windows} windows x {args.seqlen} tokens; W4A4 {args.w_quantizer}, reorder 12345, "
          f"torch threads {torch.get_num_threads()}")
    print(f"passes over the calibration set per layer: {s['passes_per_layer']}")
    print(f"(method imports, once per process, not counted: {import_s:.2f} s)")
    print(f"one FP forward, same windows {fp_forward_s:7.2f} s  (1.00x)")
    print(f"  of which decoder (no lm_head) {decoder_s:6.2f} s  ({decoder_s / fp_forward_s:.2f}x): the "
          f"{s['passes_per_layer']} passes per layer cost at least {s['passes_per_layer']} times this, plus GPTQ's "
          "Hessian products")
    for label, key in (("capture layer-0 inputs", "capture_s"), ("stats pass (FP)", "stats_s"),
                       ("transforms (k-means...)", "transform_s"), (f"weights ({args.w_quantizer})", "weights_s"),
                       ("output pass (quantized)", "output_s"), ("calibration total", "total_s")):
        print(f"{label:<28} {s[key]:7.2f} s  ({s[key] / fp_forward_s:.2f}x)")
    ratio = s["total_s"] / fp_forward_s
    print(f"calibration / FP forward = {ratio:.2f}x; target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}")
    if args.digest:
        print(f"digest {_digest(model, report)}")
    print(f"peak RSS {rss_mb:.0f} MB; load average at the end {os.getloadavg()[0]:.2f} (shared machine: compare "
          "runs taken back to back)")


if __name__ == "__main__":
    with tee_stdout(out_argument()):  # --out: the same report in a file
        main()
