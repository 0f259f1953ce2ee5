"""What produced a result: digests of file contents (cached by path, size, mtime, inode and ctime,
so a 70B checkpoint is hashed once) and a digest of the quantization code's sources.

A digest names content, not a path: the same weights copied elsewhere give the same digest,
and weights rewritten in place give a different one even when the file name stays.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import atomic_write_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The sources whose semantics decide a quantized number (what #23's documents call "code digest").
CODE_SOURCES = ("quant", "models", "rptq", "eval/ppl.py", "eval/data.py")
_CHUNK = 16 << 20


def _cache_path() -> Path:
    root = os.environ.get("RPTQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rptq")
    return Path(root) / "file_digests.json"


def file_digest(path: str | os.PathLike, cache: Path | None = None) -> str:
    """sha256 of a file's bytes; reused while the file's (path, size, mtime, inode, ctime) stay the same.

    Size and mtime alone miss a same-size rewrite within the filesystem's mtime tick, or one whose
    mtime was set back (``cp -p``, ``touch -d``); the ctime changes on every write and cannot be
    set, and a file replaced by a rename has a new inode."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
    cache = cache or _cache_path()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    if isinstance(known, dict):
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}  # stale entries of this path
        known[key] = digest
        try:
            atomic_write_text(cache, json.dumps(known, sort_keys=True))
        except OSError:
            pass  # a read-only home: hash again next time, still correct
    return digest


def files_digest(paths, root: Path | None = None) -> dict[str, str]:
    """{name relative to root (or the file name): sha256} for each file."""
    out = {}
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root is not None else path.name
        out[name] = file_digest(path)
    return out


def code_digest(root: Path = PROJECT_ROOT) -> str:
    """One digest of the quantization code (every .py under CODE_SOURCES, by relative path and bytes):
    two runs with the same digest ran the same quantization semantics."""
    sha = hashlib.sha256()
    for entry in CODE_SOURCES:
        base = root / entry
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for path in files:
            sha.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]
