"""What the eval command lines share: argparse errors on one line, and atomic output files."""
from __future__ import annotations

import argparse

from common.atomic import atomic_write_text
from common.errors import UserError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose bad-flag error is one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def write_atomic(path, text: str) -> None:
    """Write text to path through a temporary file in the same directory and os.replace."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc}") from exc
