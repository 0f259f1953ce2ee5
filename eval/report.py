"""results.json (written atomically), the printed summary, and the HTML report's command line:

    python -m eval.report DIR [DIR ...] --out report.html

(the page itself is built in eval/html_report.py).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from common.atomic import atomic_write_text, write_errors
from common.provenance import code_digest
from eval.runs import rptq_setting


# what counts as code for the "-dirty" mark: everything but docs, tests and scripts
CODE_PATHS = ("common", "quant", "models", "eval", "rptq", "main.py", "requirements.txt", "requirements-nodeps.txt")

def versions() -> dict:
    # Deliberately lazy: `python -m eval.report` (the HTML report) must not pay for torch and transformers
    # (about 7 s and 1.4 s to import on the 2-core dev box); a run calling this has them loaded already.
    import torch
    import transformers

    try:  # optional dependency
        import lm_eval

        lm_eval_version = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        lm_eval_version = "not installed"
    root = Path(__file__).resolve().parent.parent
    try:
        git = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, cwd=root,
                             timeout=5).stdout.strip() or "unknown"
        # "-dirty" only for uncommitted *code*: the results script writes docs/ (runs, steps.tsv) while it runs,
        # which must not mark its own runs as made by uncommitted code
        changed = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PATHS], capture_output=True,
                                 text=True, cwd=root, timeout=5).stdout.strip()
        git += "-dirty" if changed and git != "unknown" else ""
    except (OSError, subprocess.SubprocessError):
        git = "unknown"
    # code_digest: the quantization sources' digest, so a document built from stored runs can tell which
    # runs were produced by other code than its own (issue #23: stale runs are listed by name).
    return {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval_version,
            "git": git, "code_digest": code_digest()}


def write_json_atomic(path: Path, data: dict) -> None:
    with write_errors(path):
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def format_summary(results: dict) -> str:
    lines = [f"model: {results['model']}"]
    cfg = results["config"]
    method = results.get("method") or {}
    if method:
        lines.append(f"method: {method.get('name')}  transforms={'+'.join(method.get('transforms', [])) or 'none'}  "
                     f"grid={method.get('grid')}")
    lines.append(f"W{cfg['wbits']}A{cfg['abits']}  reorder={rptq_setting(cfg, 'reorder')!r}  "
                 f"w_quantizer={cfg['w_quantizer']}  "
                 f"policy={cfg['abits_policy']}  only_quant_kv={cfg['only_quant_kv']}")
    quantized = {k: v for k, v in results["bit_manifest"].items() if v["bits"] < 16}
    if quantized:
        lines.append("quantized points: " + ", ".join(f"{k}={v['bits']}b/{v['granularity']}"
                                                       for k, v in quantized.items()))
    for name, value in results["ppl"].items():
        base = (results.get("ppl_base") or {}).get(name)
        lines.append(f"ppl {name:<12} {value:.4f}" + (f"   (unquantized: {base:.4f})" if base is not None else ""))
    for task, metrics in results["tasks"].items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
        lines.append(f"task {task:<16} {shown}")
    t = results["timing"]
    lines.append(f"time: calibration {t['calibration_s']:.1f}s, eval {t['eval_s']:.1f}s; "
                 f"peak RSS {results['memory']['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """This process's peak resident set (MiB) since it started its current program.

    Linux's VmHWM, not getrusage's ru_maxrss: on exec the kernel carries the parent's
    high-water mark over into ru_maxrss, so a run launched by a large process (a
    benchmark that has just written a multi-GB checkpoint) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    """The HTML report CLI. Deliberately lazy: a calibration run imports this module for results.json, and
    the report's matplotlib costs about 2.5 s to import (measured, 2-core dev box)."""
    from eval.html_report import main as html_main

    return html_main(argv)


if __name__ == "__main__":
    sys.exit(main())
