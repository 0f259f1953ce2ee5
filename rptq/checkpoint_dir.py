"""A --save_quantized directory replaced whole: written into a sibling, moved into place when complete.

Saving over an existing checkpoint must never leave a mixture (new block 0, old block 1 and
quant.json) that loads. The new checkpoint is written into ``.NAME.saving-PID-ID`` beside the
destination; only when it is complete is the old one renamed to ``.NAME.replaced-ID``, the new one
renamed into place, and the old one deleted. A killed save leaves the previous checkpoint intact
(or, between the two renames, aside under its ``.replaced`` name, which loading points to);
siblings left by a dead process are removed by the next save to the same place.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import UserError

_SAVING, _REPLACED = ".saving-", ".replaced-"


def _siblings(dest: Path, kind: str) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}{kind}*"))


def _is_checkpoint(path: Path) -> bool:
    """Ours to replace: a checkpoint, or what an older version's interrupted save left (block files)."""
    return (path / "quant.json").is_file() or any(path.glob("block-*.safetensors"))


def check_save_target(dest: str | os.PathLike) -> None:
    """Replacing deletes the old directory: only a checkpoint or an empty directory may be replaced."""
    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()) and not _is_checkpoint(dest):
        raise UserError(f"--save_quantized {dest} exists and is not a checkpoint directory (a save replaces it "
                        "whole); pass a new directory")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale(dest: Path) -> None:
    """Partial saves of processes that no longer run (a live one may be another save: left alone)."""
    for path in _siblings(dest, _SAVING):
        pid = path.name[len(f".{dest.name}{_SAVING}"):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def interrupted_hint(dest: Path) -> str:
    """For a missing checkpoint: where a save killed between its two renames left the previous one."""
    aside = [p for p in _siblings(dest, _REPLACED) if (p / "quant.json").is_file()]
    if not aside:
        return ""
    return f"; a killed --save_quantized left the previous checkpoint at {aside[-1]}: rename it back to {dest.name}"


@contextmanager
def replacing(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty sibling directory to write into; on success it becomes ``dest``."""
    dest = Path(dest)
    check_save_target(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    work = dest.parent / f".{dest.name}{_SAVING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    aside = dest.parent / f".{dest.name}{_REPLACED}{uuid.uuid4().hex[:8]}"
    if dest.exists():
        os.rename(dest, aside)
    os.rename(work, dest)
    for old in _siblings(dest, _REPLACED):  # this one, and any a killed save left: dest supersedes them
        shutil.rmtree(old, ignore_errors=True)
