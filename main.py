"""RPTQ toolkit command line: `python main.py MODEL [options]` (flag names follow RPTQ's main.py)."""
from __future__ import annotations

import signal
import sys

from common.errors import UserError
from models.hub import configure_hub
from rptq.cli import BITS, OneLineParser, build_parser, given_flags  # noqa: F401  (the tests use them from here)
from rptq.flags import build_config
from rptq.run_calibration import CalibrationInterrupted
from rptq.runner import run

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_hub()  # before any hub lookup: offline mode when it cannot be reached
        run(build_config(args), given_flags(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def command(argv=None) -> int:
    """``python main.py``: :func:`main`, with Ctrl-C (exit 130) or SIGTERM (exit 143, a scheduler's kill)
    as one line saying what was kept. (main() lets KeyboardInterrupt through, so in-process callers such
    as the tests see it.)"""
    terminated = []

    def on_sigterm(signum, frame):  # the same orderly stop as Ctrl-C: finished layers stay resumable
        terminated.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main(argv)
    except KeyboardInterrupt as exc:
        print(exc if isinstance(exc, CalibrationInterrupted)
              else "interrupted; rerun the same command (calibration state kept under --output_path is reused)",
              file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130


if __name__ == "__main__":
    sys.exit(command())
