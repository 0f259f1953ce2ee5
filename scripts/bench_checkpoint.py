"""Packed checkpoint size on an OPT-125m-shaped model (random weights, injected outliers).

Calibrates W4/W3/W2 (RTN weights, RPTQ's default clusters, a few short calibration
windows), saves each with --save_quantized under three weight-scale formats -- exact
(fp32 unless every scale happens to be an fp16 number), fp16 (--pack_weight) and sf8
(--scale_format sf8) -- and prints the decoder weights' stored bytes against fp16, the
checkpoint's files, and whether reloading reproduces the logits bit for bit.

    .venv/bin/python scripts/bench_checkpoint.py [--layers 12 --windows 4 --seqlen 128]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from models.synthetic import OPT_125M_SHAPE, inject_opt_outliers, random_opt  # noqa: E402
from rptq.checkpoint import load_quantized, save_quantized  # noqa: E402
from rptq.config import QuantConfig  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402

TARGETS = {4: 0.30, 3: 0.22, 2: 0.16}  # codes + scales vs fp16, the target per bit width
SCALES = {"exact": {}, "fp16": {"fp16_scales": True}, "sf8": {"sf8_scales": True}}


def _tokenizer(dest: Path):
    from tests.helpers import gpt2_tokenizer

    return gpt2_tokenizer(dest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=OPT_125M_SHAPE["num_hidden_layers"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--scales", default="exact,fp16,sf8")
    ap.add_argument("--no_reload", action="store_true", help="skip the reload check")
    add_out_flag(ap, "checkpoint.txt")
    args = ap.parse_args()

    shape = dict(OPT_125M_SHAPE, num_hidden_layers=args.layers, max_position_embeddings=2048)
    base = inject_opt_outliers(random_opt(seed=0, **shape), seed=1)
    windows = torch.randint(4, 50000, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    tokenizer = _tokenizer(work / "tok")
    print(f"model: OPT-125m shape, {args.layers} layers, random weights + injected outliers; {args.windows} windows "
          f"x {args.seqlen} tokens; RTN weights, RPTQ default clusters (R1..R5 = 32,4,4,32,32), reference grid, "
          f"activations FP (sizes do not depend on them)")
    print(f"{'W':>2} {'scales':>6} {'packed MiB':>10} {'fp16 MiB':>9} {'ratio':>7} {'target':>6} {'zero exc.':>9} "
          f"{'ckpt MiB':>8} {'save s':>6} {'reload':>7}")
    for bits in (int(b) for b in args.bits.split(",")):
        for mode in args.scales.split(","):
            model = copy.deepcopy(base)
            cfg = QuantConfig(wbits=bits, abits=16, w_quantizer="rtn", **SCALES[mode])
            adapter = adapter_for(model.config)
            quantize_model(model, adapter, windows, cfg, progress=False)
            out = work / f"w{bits}-{mode}"
            start = time.perf_counter()
            size = save_quantized(out, model, adapter, tokenizer, {"bit_manifest": {}})
            save_s = time.perf_counter() - start
            exceptions = _zero_exceptions(out)
            reload = "-"
            if not args.no_reload:
                loaded = load_quantized(out, torch.device("cpu"))[0]
                with torch.no_grad():
                    same = torch.equal(loaded(windows[:1]).logits, model(windows[:1]).logits)
                reload = "exact" if same else "DIFFERS"
            mib = 2**20
            print(f"{bits:>2} {mode:>6} {size['decoder_weight_bytes_packed'] / mib:10.3f} "
                  f"{size['decoder_weight_bytes_fp16'] / mib:9.3f} {size['ratio']:7.4f} {TARGETS.get(bits, 0):6.2f} "
                  f"{exceptions:9d} {size['checkpoint_bytes'] / mib:8.2f} {save_s:6.1f} {reload:>7}", flush=True)


def _zero_exceptions(root: Path) -> int:
    import json

    from safetensors import safe_open

    total = 0
    for path in sorted(root.glob("block-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            packed = json.loads(handle.metadata()["packed"])
        total += sum(m.get("zero_exceptions", 0) for m in packed.values())
    return total


if __name__ == "__main__":
    with tee_stdout(out_argument()):  # --out: the same report in a file
        main()
