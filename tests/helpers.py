"""Tiny models and a real GPT-2 BPE tokenizer, built offline with fixed seeds."""
import os
from pathlib import Path


from models.synthetic import gpt2_tokenizer_dir, inject_opt_outliers, random_opt  # noqa: F401  (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def load_script(relative: str):
    """A script under scripts/ as a module (scripts/ is not a package), e.g. "scripts/parity/ours.py"."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpt2_tokenizer(dest: Path):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(dest)))


def tiny_opt(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128,
             vocab: int = 50272, max_pos: int = 256):
    """An OPT-architecture model with random weights (fp32, eval mode)."""
    return random_opt(seed, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=max_pos)


def save_tiny_opt_dir(dest: Path, seed: int = 0, **kw) -> Path:
    """A local Hugging Face model directory: config + safetensors + GPT-2 tokenizer."""
    model = tiny_opt(seed=seed, **kw)
    model.save_pretrained(str(dest), safe_serialization=True)
    gpt2_tokenizer_dir(dest)
    return dest



def rptq_config(reorder: str = "12345", clusters: dict | None = None, **shared):
    """A QuantConfig with RPTQ's reorder points and cluster counts (``clusters``: {"R1": 4, ...}) set."""
    from rptq.config import QuantConfig
    from rptq.methods.rptq import RPTQSettings

    counts = {f"{point}_clusters": count for point, count in (clusters or {}).items()}
    return QuantConfig(**shared).using(RPTQSettings(reorder=reorder, **counts))
