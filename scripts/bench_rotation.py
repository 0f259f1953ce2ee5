"""Figures for quant/rotation.py: search time, orthogonality of R by accumulation precision, and
the outlier reduction on the DuQuant spec's synthetic input (section 11.9, no smoothing).

    python scripts/bench_rotation.py [--out FILE]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402
from quant.quantizer import affine_params, fake_quant  # noqa: E402
from quant.rotation import (apply_block_rotation, apply_duquant, duquant_transform,  # noqa: E402
                            greedy_rotation, randomised_base, step_rotation, sylvester_hadamard)


def orth_err(r):
    return (r.double() @ r.double().T - torch.eye(r.shape[0], dtype=torch.float64)).abs().max().item()


def per_token_4bit_rel_mse(x):
    scale, zero = affine_params(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 4)
    return ((fake_quant(x, scale, zero, 4) - x).pow(2).mean() / x.pow(2).mean()).item()


def stats(name, x):
    m = x.abs().amax(0)
    print(f"  {name:<28} absmax {x.abs().max():8.1f}  max/mean channel absmax {m.max() / m.mean():7.2f}"
          f"  4-bit per-token rel MSE {per_token_4bit_rel_mse(x):.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_flag(ap, "rotation.txt")
    ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(2048, 1536, generator=torch.Generator().manual_seed(0))
    x[:, [7, 900]] *= 30
    x[3, 1000] = 1500.0
    for index in ("official", "paper"):
        start = time.perf_counter()
        t = duquant_transform(x, 128, steps=256, outlier_index=index, generator=torch.Generator().manual_seed(1))
        print(f"duquant_transform 2048x1536 fp32, n=128, 256 steps, {index}: {time.perf_counter() - start:.2f} s"
              f" (R1/R2 orthogonality {orth_err(t.r1):.1e}/{orth_err(t.r2):.1e})")
    start = time.perf_counter()
    greedy_rotation(x, 128, 256, generator=torch.Generator().manual_seed(1), fresh_base_each_step=True)
    print(f"one greedy_rotation, fresh base each step: {time.perf_counter() - start:.2f} s")

    base, gen = randomised_base(128, torch.Generator().manual_seed(2)), torch.Generator().manual_seed(3)
    acc = {"fp64": torch.eye(128, dtype=torch.float64), "fp32": torch.eye(128),
           "fp16 (fp32 products)": torch.eye(128).half(), "fp16 (native CPU)": torch.eye(128).half()}
    for d in torch.randint(0, 128, (256,), generator=gen):
        s = step_rotation(base, int(d))
        acc["fp64"] = acc["fp64"] @ s
        acc["fp32"] = acc["fp32"] @ s.float()
        acc["fp16 (fp32 products)"] = (acc["fp16 (fp32 products)"].float() @ s.half().float()).half()
        acc["fp16 (native CPU)"] = acc["fp16 (native CPU)"] @ s.half()
    print("max|R R^T - I| after 256 step products: "
          + ", ".join(f"{k} {orth_err(v):.1e}" for k, v in acc.items()))

    print("synthetic 512x1024, 4 channels x30, one 1500 entry (raw, no smoothing), n=128, 256 steps:")
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(512, 1024, generator=gen)
    x[:, torch.randperm(1024, generator=gen)[:4]] *= 30
    x[100, 500] = 1500.0
    stats("input", x)
    for index in ("official", "paper"):
        t = duquant_transform(x, 128, steps=256, outlier_index=index, generator=torch.Generator().manual_seed(23))
        stats(f"R1 ({index})", apply_block_rotation(x, t.r1))
        stats(f"R1 P R2 ({index})", apply_duquant(x, *t))
    stats("block Hadamard H_128", apply_block_rotation(x, sylvester_hadamard(128)))


if __name__ == "__main__":
    with tee_stdout(out_argument()):  # --out: the same report in a file
        main()
