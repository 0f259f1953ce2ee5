"""The content a model name stands for: a digest of its weight, config and tokenizer files.

Resume state and checkpoints are bound to this digest, so weights replaced under the same
directory name are never mistaken for the ones a calibration was made from.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.provenance import files_digest

from .loading import local_model_dir, resolve

# Files that decide the model's numbers or its tokenization (README/licence files do not).
_PATTERNS = ("*.safetensors", "*.gguf", "*.json", "*.txt", "*.model", "*.tiktoken")


def model_files(name: str, cache_dir: str | None = None) -> tuple[Path, list[Path]]:
    """(root, files) of the model behind ``name``: weights, config and tokenizer."""
    source = resolve(name)
    if source.kind == "gguf":
        root = Path(source.location)
        return root, [root / source.gguf_file]
    root = Path(local_model_dir(name, cache_dir))
    files = sorted({p for pattern in _PATTERNS for p in root.glob(pattern) if p.is_file()})
    return root, files


def model_digest(name: str, cache_dir: str | None = None) -> dict:
    """{"digest": one sha256 over every file's digest, "files": {name: sha256}}."""
    root, files = model_files(name, cache_dir)
    per_file = files_digest(files, root)
    digest = hashlib.sha256(json.dumps(per_file, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "files": per_file}
