"""Layer-output error of GPTQT against RTN / GPTQ / plain BCQ on the synthetic layer of tests/test_gptqt.py
(128 x 256 t(4) weights, correlated inputs with 4 channels 16x larger, Hessian from 4096 tokens).

Error: sum_r (w_r - w_hat_r) H (w_r - w_hat_r)^T with the undamped H. Per row and with groups of 128.

    .venv/bin/python scripts/gptqt_synthetic.py [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402
from quant.bcq import bcq_quantize  # noqa: E402
from quant.gptqt import GPTQTConfig, gptqt_quantize  # noqa: E402
from quant.quantizer import quantize_weight_rtn, weight_group_params  # noqa: E402
from tests.test_gptqt import gptq_for, synthetic_layer  # noqa: E402


def methods(k: int):
    """(name, callable(w, x, group_sizes) -> w_hat)."""
    def gptq(bits):
        return lambda w, x, gs: gptq_for(x).quantize(w, *weight_group_params(w, gs, bits), bits, gs)

    def gptqt(use_gptq=True, **kw):
        return lambda w, x, gs: gptqt_quantize(w, gptq_for(x) if use_gptq else None, GPTQTConfig(bits=k, **kw), gs)[0]

    return [(f"RTN {k}-bit", lambda w, x, gs: quantize_weight_rtn(w, gs, k)),
            (f"GPTQ {k}-bit", gptq(k)),
            (f"BCQ {k}-bit (greedy+alternating)", lambda w, x, gs: bcq_quantize(w, k, gs)[0]),
            (f"GPTQT {k + 1}->{k} no GPTQ (RTN codes)", gptqt(False)),
            (f"GPTQT {k + 1}->{k} variant A", gptqt(variant="A")),
            (f"GPTQT {k + 1}->{k} variant B", gptqt()),
            (f"GPTQT {k + 1}->{k} B, gamma=1 only", gptqt(gammas=(1.0,))),
            (f"GPTQT {k + 1}->{k} B, unweighted h=1", gptqt(hessian_weighted=False)),
            (f"GPTQT {k + 1}->{k} B, full-H score", gptqt(score="full")),
            (f"GPTQT {k + 2}->{k} B (step1bit)", gptqt(inter_bits=k + 2)),
            (f"GPTQ {k + 1}-bit (reference)", gptq(k + 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    add_out_flag(ap, "gptqt_synthetic.txt")
    args = ap.parse_args()
    w, x = synthetic_layer(seed=args.seed)
    H = gptq_for(x).hessian.double()

    def err(q):
        e = (w - q).double()
        return torch.einsum("rc,cd,rd->", e, H, e).item()

    print("| method | per row | group 128 | seconds (per row) |\n|---|---|---|---|")
    for k in (3, 2):
        for name, fn in methods(k):
            t0 = time.perf_counter()
            row = err(fn(w, x, None))
            secs = time.perf_counter() - t0
            print(f"| {name} | {row:.2f} | {err(fn(w, x, (128, 128))):.2f} | {secs:.2f} |")


if __name__ == "__main__":
    with tee_stdout(out_argument()):  # --out: the same report in a file
        main()
