"""Copy what a command prints into a file as well, written atomically once the command has finished, so a
benchmark's own output can be quoted verbatim (the README's generated blocks read these files)."""
from __future__ import annotations

import argparse
import io
import sys
from contextlib import contextmanager, redirect_stdout

from .atomic import atomic_write_text, write_errors


class _Tee(io.TextIOBase):
    """A text stream writing to several others (the terminal and a buffer)."""

    def __init__(self, *streams):
        super().__init__()
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


@contextmanager
def tee_stdout(path):
    """While the block runs, what it prints also goes to a buffer; the buffer replaces ``path`` only when the
    block ends normally (a failed run leaves the previous file, never half of one). ``path`` None: no copy."""
    if path is None:
        yield
        return
    buffer = io.StringIO()
    with redirect_stdout(_Tee(sys.stdout, buffer)):
        yield
    with write_errors(path, "--out"):
        atomic_write_text(path, buffer.getvalue())


def out_argument(argv=None) -> str | None:
    """The value of ``--out PATH`` among the arguments (the script's own parser declares and checks it too;
    this only finds it, so the whole of main() can run inside tee_stdout)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.out


def add_out_flag(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Declare the benchmark's ``--out`` (so --help shows it and the parser accepts it)."""
    parser.add_argument("--out", default=None, metavar="FILE",
                        help=f"also write what this prints to FILE, atomically when it ends "
                             f"(the README quotes docs/bench/{default_name})")
