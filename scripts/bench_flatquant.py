"""Cost of FlatQuant's per-block training (--method flatquant) and of learned weight clipping (--w_clip learned)
on a CPU, per decoder layer of SmolLM2-135M's shape (hidden 576, 9 heads on 3 K/V heads, MLP 1536; random
weights: the cost does not depend on them), with the README's calibration windows (32 x 512 tokens, batch 4).

Prints, per configuration, the seconds per layer of the learning and of the whole calibration, the seconds per
optimizer step, and what the paper's settings (15 epochs of 128 x 2048-token windows) would cost per layer at the
measured rate per token (the learning is linear in tokens for a 2048 window only up to attention's T^2 part:
a lower bound).

    .venv/bin/python scripts/bench_flatquant.py [--layers 2 --windows 32 --seqlen 512 --out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from rptq.methods import preset_config  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64)
PAPER_TOKENS = 15 * 128 * 2048  # FlatQuant's epochs x windows x tokens per block
CONFIGS = (("flatquant, 1 epoch", "flatquant", dict(flatquant=dict(epochs=1)), "flat_transform"),
           ("flatquant, 4 epochs", "flatquant", dict(flatquant=dict(epochs=4)), "flat_transform"),
           ("duquant + --w_clip learned, 2 epochs", "duquant",
            dict(w_clip_fit="learned", duquant=dict(steps=64), lwc=dict(epochs=2)), "lwc"))


def _model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, num_hidden_layers=layers, max_position_embeddings=2048, **SMOLLM2_SHAPE)
    return LlamaForCausalLM(config).float().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    add_out_flag(ap, "flatquant.txt")
    args = ap.parse_args()
    windows = torch.randint(4, 1000, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    print(f"model: SmolLM2-135M shape (random weights), {args.layers} layers; {args.windows} windows x {args.seqlen} "
          f"tokens, batch 4; torch threads {torch.get_num_threads()}")
    print(f"{'configuration':38s} {'learn s/layer':>13s} {'calib s/layer':>13s} {'s/step':>7s} {'paper s/layer':>13s}")
    for label, preset, overrides, key in CONFIGS:
        model = _model(args.layers)
        cfg = preset_config(preset, **overrides)
        start = time.perf_counter()
        report = quantize_model(model, adapter_for(model.config), windows, cfg, progress=False)
        total = time.perf_counter() - start
        learned = [d["points"][key] for d in report.decisions()]
        learn_s = sum(r["seconds"] for r in learned) / len(learned)
        steps = sum(r["steps"] for r in learned) / len(learned)
        per_token = learn_s / max(steps * learned[0]["batch"] * args.seqlen, 1)
        print(f"{label:38s} {learn_s:13.1f} {total / args.layers:13.1f} {learn_s / max(steps, 1):7.2f} "
              f"{per_token * PAPER_TOKENS:13.0f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (shared machine: compare runs taken back to back)")


if __name__ == "__main__":
    with tee_stdout(out_argument()):
        main()
