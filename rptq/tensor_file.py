"""A dict of tensors on disk: safetensors written atomically, read back with one-line errors.

The block files, the resume state and a saved model's resident tensors all go through
here, so every unreadable or mismatched file fails the same way: one :class:`CheckpointError`
line that names the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import atomic_write


class CheckpointError(ValueError):
    """A block file or checkpoint directory that cannot be read back (one line, names the file)."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata={k: json.dumps(v) for k, v in (metadata or {}).items()}))


def read_tensors(path: Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    if not Path(path).is_file():
        raise CheckpointError(f"missing file {Path(path).name}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            return {name: handle.get_tensor(name) for name in handle.keys()}, meta
    except Exception as exc:  # safetensors' own errors, truncated files, bad JSON in the header
        raise CheckpointError(f"{Path(path).name} is not a readable safetensors file ({first_line(exc)})") from None


def check_tensors(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str, prefix: str = "",
                  hint: str = "") -> None:
    """Every tensor ``want`` has, with its shape; nothing else."""
    for key, ref in want.items():
        if key not in got:
            raise CheckpointError(f"{where}: missing tensor {prefix}{key}")
        if tuple(got[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: {prefix}{key} has shape {tuple(got[key].shape)}, the model's config "
                                  f"needs {tuple(ref.shape)}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {prefix}{extra[0]}{hint}")
