"""An on-disk cache of token tensors, keyed by everything that determines them.

Stored as safetensors (no pickle) and written atomically, so an interrupted run
never leaves a truncated entry behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_write, write_errors

DEFAULT_CACHE = Path(os.environ.get("RPTQ_CACHE", Path.home() / ".cache" / "rptq-toolkit"))


def text_digest(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    """Identifies a tokenizer by its class, vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    return text_digest(json.dumps([type(tokenizer).__name__, vocab, specials, tokenizer("a b").input_ids]))


def cached_tensor(cache_dir: str | os.PathLike | None, key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    path = root / f"{key.get('what', 'tensor')}-{text_digest(json.dumps(key, sort_keys=True))}.safetensors"
    if path.is_file():
        return load_file(str(path))["data"]
    value = compute()
    with write_errors(root, "--cache_dir"):
        atomic_write(path, lambda tmp: save_file({"data": value.contiguous()}, tmp,
                                                 metadata={"key": json.dumps(key, sort_keys=True)}))
    return value
