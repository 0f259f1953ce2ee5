"""Collect results.json files into one markdown table in the RPTQ paper's layout.

    python -m eval.table DIR [DIR ...] [--out FILE.md]

One row per run, labelled with the paper's names (FP16, W4A16, ..., W4A4KV, W3A3KV) plus notes
where a run deviates from its method's recorded defaults (both from eval.runs); then perplexity
columns (wikitext2, ptb, c4, then others), zero-shot accuracy columns (percent, in the metric the
paper reports for the task, named in the header) and the calibration / evaluation wall time.
Settings shared by every run (model, calibration set, sequence length, ...) go in a line under
the table; settings that differ between runs are added to the row labels instead.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common.errors import UserError
from eval.cli import Parser, write_atomic
from eval.runs import load_runs, method_notes, order_key, row_label
from eval.task_mirrors import VARIANTS

PPL_ORDER = ("wikitext2", "ptb", "c4")
TASK_ORDER = ("lambada_openai", "lambada_flat", "piqa", "arc_easy", "arc_challenge", "openbookqa", "boolq")
# The lm-eval metric of each task's column. The RPTQ paper's piqa / ARC / OpenBookQA columns are
# acc_norm (OPT-1.3b FP16: piqa acc 71.7, acc_norm 72.5, paper 72.47); boolq and lambada are acc.
# Other tasks: acc where a run has it, else acc_norm.
PAPER_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
                "hellaswag": "acc_norm", "boolq": "acc", "lambada_openai": "acc", "lambada_standard": "acc",
                "lambada_flat": "acc", "winogrande": "acc"}
MISSING = "–"
# (config key, name in notes/caption, only meaningful for runs that calibrate)
_SETTINGS = (("model", "model", False), ("calib_dataset", "calib", True), ("nsamples", "nsamples", True),
             ("seed", "seed", True), ("seqlen", "seqlen", False), ("limit", "limit", False),
             ("num_fewshot", "fewshot", False))


# ---------------------------------------------------------------- settings
def _relevant(run: dict, key: str, calib_only: bool) -> bool:
    if calib_only and row_label(run["config"]) == "FP16":
        return False  # nothing was calibrated
    if key == "num_fewshot":
        return bool(run.get("tasks"))
    return True


def _setting(run: dict, key: str):
    value = run.get("model") if key == "model" else run["config"].get(key)
    if key == "limit" and value in (None, -1):
        return "all"
    return value


def _settings(runs: list[dict]) -> tuple[dict, dict]:
    """(settings equal in every run they apply to, {key: {run index: value}} for those that vary)."""
    common, varying = {}, {}
    for key, name, calib_only in _SETTINGS:
        values = {i: _setting(run, key) for i, run in enumerate(runs) if _relevant(run, key, calib_only)}
        distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
        if len(distinct) == 1:
            common[name] = next(iter(values.values()))
        elif distinct:
            varying[name] = values
    return common, varying


# ---------------------------------------------------------------- rendering
def _ordered(names, order) -> list[str]:
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def _number(value, fmt: str, scale: float = 1.0) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return format(value * scale, fmt) if math.isfinite(value) else str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def column_metric(task: str, metrics) -> str | None:
    """The metric shown for `task` given the metrics the runs have: PAPER_METRIC's where present,
    else acc, else acc_norm (the header names whichever it is)."""
    for metric in (PAPER_METRIC.get(task), "acc", "acc_norm"):
        if metric and metric in metrics:
            return metric
    return None


def task_columns(runs: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) per accuracy column, the metric chosen by column_metric."""
    tasks = {t for run in runs for t in (run.get("tasks") or {})}
    columns = []
    for task in _ordered(tasks, TASK_ORDER):
        metrics = {m for run in runs for m in ((run.get("tasks") or {}).get(task) or {})}
        metric = column_metric(task, metrics)
        if metric:
            columns.append((task, metric))
    return columns


def variant_notes(tasks) -> list[str]:
    """One line per offline variant among `tasks` saying how it differs from the task it imitates."""
    return [f"{t}: {VARIANTS[t][1]}." for t in tasks if t in VARIANTS]


def render_table(runs: list[dict]) -> str:
    """The markdown table (plus a line of shared settings) for runs as returned by load_runs."""
    if not runs:
        raise UserError("no runs to tabulate")
    common, varying = _settings(runs)
    rows = []
    for i, run in enumerate(runs):
        cfg = run["config"]
        label = row_label(cfg)
        notes = method_notes(run)
        for name, values in varying.items():
            if i in values:
                value = values[i]
                notes.append(f"{name}={Path(value).name if name == 'model' else value}")
        rows.append((order_key(label), bool(notes), ", ".join(notes), run.get("_path", ""), label, run))
    rows.sort(key=lambda r: r[:4])
    ppl_sets = _ordered({d for run in runs for d in (run.get("ppl") or {})}, PPL_ORDER)
    task_cols = task_columns(runs)
    header = (["Run"] + [f"{d} (ppl)" for d in ppl_sets] + [f"{t} ({m} %)" for t, m in task_cols]
              + ["calib (s)", "eval (s)"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for _, _, notes, _, label, run in rows:
        ppl, tasks, timing = run.get("ppl") or {}, run.get("tasks") or {}, run.get("timing") or {}
        cells = [label + (f" ({notes})" if notes else "")]
        cells += [_number(ppl.get(d), ".2f") for d in ppl_sets]
        cells += [_number((tasks.get(t) or {}).get(m), ".2f", 100.0) for t, m in task_cols]
        cells += [_number(timing.get("calibration_s"), ".1f"), _number(timing.get("eval_s"), ".1f")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = variant_notes(t for t, _ in task_cols)
    if notes:
        lines += [""] + notes
    if common:
        lines += ["", "Settings: " + "; ".join(f"{k} {v}" for k, v in common.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = Parser(prog="python -m eval.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="directories searched for results.json")
    parser.add_argument("--out", default=None, metavar="FILE.md", help="also write the table here (atomically)")
    args = parser.parse_args(argv)
    try:
        text = render_table(load_runs(args.dirs))
        if args.out:
            write_atomic(args.out, text)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
