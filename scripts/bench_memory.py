"""Out-of-core calibration memory: peak RSS as a ratio to the checkpoint size.

Writes a synthetic OPT checkpoint (random weights, sharded safetensors; OPT-1.3b shape
by default, ~5 GB in fp32) without ever holding it whole in memory, then runs
`main.py CKPT --offload_dir ...` in a fresh process and reads that process's peak RSS
and calibration time from its results.json.

    .venv/bin/python scripts/bench_memory.py [--layers 24 --hidden 2048 --work /tmp/rptq-bench-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from common.tee import add_out_flag, out_argument, tee_stdout  # noqa: E402

SHARD_BYTES = 1 << 30


def write_checkpoint(dest: Path, layers: int, hidden: int, seed: int = 0) -> int:
    """Config + sharded safetensors + GPT-2 tokenizer; returns the checkpoint's tensor bytes."""
    from accelerate import init_empty_weights
    from transformers import OPTConfig, OPTForCausalLM

    from tests.helpers import gpt2_tokenizer_dir

    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                       ffn_dim=4 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=2048,
                       do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    with init_empty_weights():
        skeleton = OPTForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    weight_map, shard, shard_bytes, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(dest / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, index = {}, 0, index + 1

    for name, param in skeleton.named_parameters():  # lm_head is tied to the embeddings: not stored
        if "layer_norm" in name:
            value = torch.ones(param.shape) if name.endswith("weight") else torch.zeros(param.shape)
        else:
            value = torch.randn(param.shape, generator=gen) * 0.02
        shard[name] = value
        shard_bytes += value.numel() * 4
        total += value.numel() * 4
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(str(dest))
    gpt2_tokenizer_dir(dest)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--work", default="/tmp/rptq-bench-memory")
    add_out_flag(ap, "memory.txt")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    size = write_checkpoint(work / "ckpt", args.layers, args.hidden)
    print(f"synthetic OPT checkpoint: {args.layers} layers, hidden {args.hidden}, {size / 2**30:.2f} GiB fp32 "
          f"({len(list((work / 'ckpt').glob('*.safetensors')))} shards), written in {time.perf_counter() - start:.0f} s")
    text = work / "calib.txt"
    text.write_text(" ".join(f"token{i % 997} and word{i % 113}." for i in range(20000)))
    cmd = [sys.executable, str(ROOT / "main.py"), str(work / "ckpt"), "--wbits", "4", "--abits", "4",
           "--offload_dir", str(work / "blocks"), "--calib_dataset", f"file:{text}", "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--eval_ppl", "--ppl_datasets", f"file:{text}", "--limit", "2",
           "--cache_dir", str(work / "cache"), "--output_path", str(work / "out"), "--no_progress"]
    print("running:", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((work / "out" / "results.json").read_text())
    rss = res["memory"]["peak_rss_mb"] * 2**20
    calib = res["calibration"]
    print(f"calibration: {calib['total_s']:.0f} s total, {calib['total_s'] / args.layers:.1f} s per layer "
          f"(stats {calib['stats_s']:.0f} s, transforms {calib['transform_s']:.0f} s, GPTQ {calib['weights_s']:.0f} s, "
          f"output {calib['output_s']:.0f} s); layer-by-layer ppl eval {res['timing']['eval_s']:.0f} s")
    print(f"peak RSS of the calibrating process: {rss / 2**30:.2f} GiB = {rss / size:.3f} x checkpoint size "
          f"(target <= 0.25)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with tee_stdout(out_argument()):  # --out: the same report in a file
        main()
