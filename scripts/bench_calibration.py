"""Calibration cost of RPTQ on an OPT-125m-shaped model (random weights, injected outliers).

Prints passes per layer, where the time goes (stats / k-means / GPTQ / output),
peak RSS, and calibration time as a ratio to one FP forward over the same windows.

    .venv/bin/python scripts/bench_calibration.py [--windows 16 --seqlen 512 --layers 12]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eval.report import peak_rss_mb  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from models.synthetic import OPT_125M_SHAPE, inject_opt_outliers, random_opt  # noqa: E402
from rptq.config import QuantConfig  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=OPT_125M_SHAPE["num_hidden_layers"])
    ap.add_argument("--w_quantizer", default="gptq", choices=("gptq", "rtn"))
    args = ap.parse_args()

    shape = dict(OPT_125M_SHAPE, num_hidden_layers=args.layers, max_position_embeddings=2048)
    model = inject_opt_outliers(random_opt(seed=0, **shape), seed=1)
    windows = torch.randint(4, 50000, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0), use_cache=False)
    fp_forward_s = time.perf_counter() - start

    cfg = QuantConfig(wbits=4, abits=4, w_quantizer=args.w_quantizer)
    report = quantize_model(model, adapter_for(model.config), windows, cfg, progress=False)
    s = report.summary()
    rss_mb = peak_rss_mb()

    print(f"model: OPT-125m shape, {args.layers} layers, random weights + injected outliers; "
          f"{args.windows} windows x {args.seqlen} tokens; W4A4 {args.w_quantizer}, reorder 12345, "
          f"torch threads {torch.get_num_threads()}")
    print(f"passes over the calibration set per layer: {s['passes_per_layer']}")
    print(f"capture layer-0 inputs   {s['capture_s']:7.2f} s")
    print(f"stats pass (FP)          {s['stats_s']:7.2f} s")
    print(f"transforms (k-means...) {s['transform_s']:7.2f} s")
    print(f"weights ({args.w_quantizer:<4})            {s['weights_s']:7.2f} s")
    print(f"output pass (quantized)  {s['output_s']:7.2f} s")
    print(f"calibration total        {s['total_s']:7.2f} s")
    print(f"one FP forward, same windows {fp_forward_s:7.2f} s -> calibration / FP forward = "
          f"{s['total_s'] / fp_forward_s:.1f}x")
    print(f"peak RSS {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
