"""Every method and its main flags, end to end through main.py on tiny OPT and Llama models: one line per
run with its perplexity (every digit) and a digest of its per-layer errors and decisions.

A refactor that claims "numbers unchanged" prints the same lines before and after (diff the two files).
Tiny random models with injected outliers, 4 windows x 64 tokens: about a minute on 2 idle cores.

    .venv/bin/python scripts/method_digests.py [--only NAME] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import main as cli  # noqa: E402
from common.tee import add_out_flag, tee_stdout  # noqa: E402
from models.synthetic import gpt2_tokenizer_dir, inject_opt_outliers, random_opt  # noqa: E402

SMALL = ["--R1_clusters", "4", "--R2_clusters", "2", "--R3_clusters", "2", "--R4_clusters", "4", "--R5_clusters", "4"]
ROT = ["--rotation_block", "16", "--rotation_steps", "8"]
RUNS: dict[str, list[str]] = {
    "rptq": [*SMALL],
    "rptq-rtn-mse": ["--w_quantizer", "rtn", "--metric", "mse", *SMALL],
    "rptq-layer-mse": ["--metric", "layer_mse", *SMALL],
    "rptq-dynamic-token": ["--a_dynamic", "--a_dynamic_method", "per_token", *SMALL],
    "rptq-grid-full-with-zero": ["--grid", "full", "--w_range", "with_zero", *SMALL],
    "rptq-kv3": ["--abits", "3", "--only_quant_kv", *SMALL],
    "w4a16-g32": ["--abits", "16", "--reorder", "", "--w_group_size", "32"],
    "smooth-reorder": ["--transforms", "smooth,reorder", *SMALL],
    "smoothquant": ["--method", "smoothquant"],
    "smoothquant-dynamic": ["--method", "smoothquant", "--a_dynamic", "--smooth_alpha", "0.8"],
    "fptq": ["--method", "fptq"],
    "fptq-gptq": ["--method", "fptq", "--w_quantizer", "gptq", "--fptq_v0", "1", "--fptq_v1", "5"],
    "duquant": ["--method", "duquant", *ROT],
    "duquant-gptq": ["--method", "duquant", "--w_quantizer", "gptq", *ROT],
    "duquant-paper-nopermute": ["--method", "duquant", "--outlier_index", "paper", "--no_permute", *ROT],
    "rotation": ["--method", "rotation", "--rotation_block", "16"],
    "quarot": ["--method", "quarot"],
    "quarot-rtn-random": ["--method", "quarot", "--w_quantizer", "rtn", "--residual_rotation", "random",
                          "--act_clip", "1.0"],
    "quarot-reorder": ["--transforms", "residual_rotate,reorder", *SMALL],
    "spinquant": ["--method", "spinquant", "--spin_steps", "2", "--spin_samples", "2"],
    "spinquant-rtn": ["--method", "spinquant", "--w_quantizer", "rtn", "--spin_steps", "1", "--spin_samples", "1"],
    "gptqt": ["--wbits", "3", "--abits", "16", "--w_quantizer", "gptqt", "--reorder", ""],
    "gptqt-a": ["--wbits", "2", "--abits", "16", "--w_quantizer", "gptqt", "--gptqt_variant", "A", "--reorder", ""],
    "bcq": ["--wbits", "3", "--abits", "16", "--w_quantizer", "bcq", "--reorder", ""],
    "flatquant": ["--method", "flatquant", "--flat_epochs", "1"],
    "flatquant-gptq-asym": ["--method", "flatquant", "--flat_epochs", "1", "--w_quantizer", "gptq", "--grid", "full",
                            "--a_asym", "--w_group_size", "32", "--flat_scale_param", "log"],
    "duquant-lwc": ["--method", "duquant", *ROT, "--w_clip", "learned", "--lwc_epochs", "1"],
}
COMMON = ["--eval_ppl", "--ppl_datasets", "ptb", "--calib_dataset", "ptb", "--nsamples", "4", "--seqlen", "64",
          "--limit", "2", "--seed", "2", "--no_progress", "--no_resume"]


def _opt_dir(dest: Path) -> Path:
    from transformers import GPT2Tokenizer

    model = inject_opt_outliers(random_opt(0, vocab_size=50272, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, ffn_dim=128, max_position_embeddings=128), seed=1)
    model.save_pretrained(str(dest), safe_serialization=True)
    _tokenizer(GPT2Tokenizer, dest)
    return dest


def _llama_dir(dest: Path) -> Path:
    """GQA (4 query heads on 2 K/V heads), RoPE, a few outlier channels in the norms' gains."""
    from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
                norm.weight[:3] *= 20
    model.save_pretrained(str(dest), safe_serialization=True)
    _tokenizer(GPT2Tokenizer, dest)
    return dest


def _tokenizer(cls, dest: Path) -> None:
    tok_dir = gpt2_tokenizer_dir(dest.parent / f"{dest.name}-tok")
    cls.from_pretrained(str(tok_dir)).save_pretrained(str(dest))


def _without_seconds(value):
    """``value`` without its wall-clock entries (a learned step reports its "seconds"): they differ run to run."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def digest(result: dict) -> str:
    """The numbers a run produced: perplexity, per-layer errors, decisions (less their timings) and the bit
    manifest."""
    keep = {k: _without_seconds(result.get(k)) for k in ("ppl", "layer_errors", "decisions", "bit_manifest")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma list of run names")
    add_out_flag(ap, "method_digests.txt")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    with tee_stdout(args.out), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"opt": _opt_dir(root / "opt"), "llama": _llama_dir(root / "llama")}
        for name in names:
            for arch, model_dir in models.items():
                out = root / "out" / f"{arch}-{name}"
                argv = [str(model_dir), *COMMON, "--cache_dir", str(root / "cache"), "--output_path", str(out),
                        *RUNS[name]]
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                    code = cli.main(argv)
                if code != 0:
                    print(f"{arch:5s} {name:26s} exit {code}: {err.getvalue().strip()}")
                    continue
                result = json.loads((out / "results.json").read_text())
                print(f"{arch:5s} {name:26s} ppl {result['ppl']['ptb']!r:24s} {digest(result)}", flush=True)


if __name__ == "__main__":
    main()
