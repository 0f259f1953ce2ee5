"""Write a file so that readers see the old version or the new one, never half of it; a write the
user's disk refuses (full, quota, read-only) becomes one line naming the place."""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import UserError

# A full disk, a quota, a read-only or forbidden place: the user's to fix, so one line, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR}


def atomic_write(dest: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` fills a temporary file beside ``dest``, which then replaces ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results and caches are meant to be shared
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write(dest, lambda tmp: Path(tmp).write_text(text))


@contextmanager
def write_errors(path, flag: str = "--output_path"):
    """Turns a failed write under ``path`` into a UserError naming it (the atomic writers leave nothing
    half-written behind)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"could not write {path}: {exc.strerror} ({errno.errorcode[exc.errno]}); free space or pass "
                        f"another {flag}") from None
