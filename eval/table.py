"""Collect results.json files into one markdown table in the RPTQ paper's layout.

    python -m eval.table DIR [DIR ...] [--out FILE.md]

One row per run, labelled with the paper's names (FP16, W4A16, ..., W4A4KV, W3A3KV) plus notes
where a run deviates from the method's defaults; then perplexity columns (wikitext2, ptb, c4,
then others), zero-shot accuracy columns (percent, in the metric the paper reports for the task,
named in the header) and the calibration / evaluation wall time.
Settings shared by every run (model, calibration set, sequence length, ...) go in a line under
the table; settings that differ between runs are added to the row labels instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from eval.task_mirrors import VARIANTS
from rptq.config import DEFAULT_CLUSTERS, FP, QuantConfig
from common.errors import UserError

PAPER_ROWS = ("FP16", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV")
PPL_ORDER = ("wikitext2", "ptb", "c4")
TASK_ORDER = ("lambada_openai", "lambada_flat", "piqa", "arc_easy", "arc_challenge", "openbookqa", "boolq")
# The lm-eval metric of each task's column. The RPTQ paper's piqa / ARC / OpenBookQA columns are
# acc_norm (OPT-1.3b FP16: piqa acc 71.7, acc_norm 72.5, paper 72.47); boolq and lambada are acc.
# Other tasks: acc where a run has it, else acc_norm.
PAPER_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
                "hellaswag": "acc_norm", "boolq": "acc", "lambada_openai": "acc", "lambada_standard": "acc",
                "lambada_flat": "acc", "winogrande": "acc"}
MISSING = "–"
_DEFAULTS = QuantConfig()
# (config key, name in notes/caption, only meaningful for runs that calibrate)
_SETTINGS = (("model", "model", False), ("calib_dataset", "calib", True), ("nsamples", "nsamples", True),
             ("seed", "seed", True), ("seqlen", "seqlen", False), ("limit", "limit", False),
             ("num_fewshot", "fewshot", False))


# ---------------------------------------------------------------- loading
def _read_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); delete it and rerun that row") from exc
    cfg = data.get("config") if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) for k in ("wbits", "abits")):
        raise UserError(f"{path} is not an RPTQ results.json (no config.wbits / config.abits)")
    data["_path"] = str(path)
    return data


def load_runs(dirs) -> list[dict]:
    """Every results.json under the given directories (searched recursively; a results.json file
    may be named directly), each as its parsed dict plus "_path". Raises UserError when a
    directory is missing, nothing is found, or a file cannot be parsed."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    found: dict[Path, None] = {}
    for entry in dirs:
        root = Path(entry)
        if root.is_file():
            found[root.resolve()] = None
        elif root.is_dir():
            for path in sorted(root.rglob("results.json")):
                if path.is_file():
                    found[path.resolve()] = None
        else:
            raise UserError(f"{root} does not exist; pass the --output_path directories of main.py runs")
    if not found:
        where = ", ".join(str(d) for d in dirs) or "(no directories given)"
        raise UserError(f"no results.json found under {where}; run main.py with --output_path first")
    return [_read_run(path) for path in found]


# ---------------------------------------------------------------- labels
def _bits(cfg: dict) -> tuple[int, int]:
    w = FP if cfg.get("disable_w_quant") else cfg["wbits"]
    a = FP if cfg.get("disable_a_quant") else cfg["abits"]
    return w, a


def row_label(cfg: dict) -> str:
    """The paper's name for a run's bit setting: FP16, W4A16, W4A4, W4A4KV (only K/V quantized)."""
    w, a = _bits(cfg)
    if w >= FP and a >= FP:
        return "FP16"
    return f"W{w}A{a}" + ("KV" if cfg.get("only_quant_kv") and a < FP else "")


def _preset(cfg: dict) -> dict:
    """The settings a run's --method implies (rptq's defaults for results written before presets)."""
    import dataclasses

    from rptq.methods import PRESETS

    preset = dict(PRESETS.get(cfg.get("method", "rptq"), PRESETS["rptq"]))
    preset.pop("smooth", None), preset.pop("rotation", None)
    base = {k: v for k, v in dataclasses.asdict(_DEFAULTS).items() if not isinstance(v, dict)}
    base.update(preset)
    base["transforms"] = list(base["transforms"])
    return base


def method_notes(cfg: dict) -> list[str]:
    """Short notes for method settings that differ from the run's method preset (RPTQ's defaults
    for --method rptq) and matter for this run; a method other than RPTQ is named first."""
    w, a = _bits(cfg)
    if w >= FP and a >= FP:
        return []
    defaults = _preset(cfg)
    notes = []
    if cfg.get("method", "rptq") != "rptq":
        notes.append(cfg["method"])
    if cfg.get("transforms") is not None and list(cfg["transforms"]) != defaults["transforms"]:
        notes.append("transforms " + "+".join(cfg["transforms"]))
    if cfg.get("disable_w_quant"):
        notes.append("--disable_w_quant")
    if cfg.get("disable_a_quant"):
        notes.append("--disable_a_quant")
    reorder = cfg.get("reorder", _DEFAULTS.reorder)
    reordering = "reorder" in (cfg.get("transforms") or defaults["transforms"])
    if reordering and reorder == "":
        notes.append("per-tensor baseline")
    elif reordering and sorted(reorder) != sorted(_DEFAULTS.reorder):
        notes.append("reorder R" + ",R".join(sorted(reorder)))
    clusters = cfg.get("clusters") or {}
    changed = [f"R{p}={clusters[f'R{p}']}" for p in sorted(reorder)
               if clusters.get(f"R{p}", DEFAULT_CLUSTERS[f"R{p}"]) != DEFAULT_CLUSTERS[f"R{p}"]]
    if reordering and changed:
        notes.append("clusters " + ",".join(changed))
    acts = a < FP
    if acts and not cfg.get("only_quant_kv") and cfg.get("abits_policy", defaults["abits_policy"]) != \
            defaults["abits_policy"]:
        notes.append(cfg["abits_policy"])
    if acts and cfg.get("a_dynamic"):
        notes.append("dynamic acts" + (" per token" if cfg.get("a_dynamic_method") == "per_token" else ""))
    if acts and cfg.get("metric", _DEFAULTS.metric) != _DEFAULTS.metric:
        notes.append(f"metric {cfg['metric']}")
    if acts and reordering and cfg.get("kmeans_features", "minmax") != "minmax":
        notes.append(f"k-means on {cfg['kmeans_features']} ranges")
    for key, label in (("grid", "grid"), ("w_range", "weight range"), ("w_group_size", "group"),
                       ("w_clip", "w_clip")):
        if key in cfg and cfg[key] != defaults.get(key):
            notes.append(f"{label} {cfg[key]}")
    if w < FP and cfg.get("w_quantizer", defaults["w_quantizer"]) != defaults["w_quantizer"]:
        notes.append(str(cfg["w_quantizer"]).upper())
    if w < FP and cfg.get("percdamp", _DEFAULTS.percdamp) != _DEFAULTS.percdamp:
        notes.append(f"percdamp {cfg['percdamp']}")
    return notes


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
def _order_key(label: str) -> tuple:
    if label in PAPER_ROWS:
        return (0, PAPER_ROWS.index(label), 0, 0, 0)
    w, _, rest = label[1:].partition("A")
    a = rest.removesuffix("KV")
    return (1, 0, -int(w), -int(a), label.endswith("KV")) if w.isdigit() and a.isdigit() else (2, 0, 0, 0, 0)


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


def _task_columns(runs: list[dict]) -> list[tuple[str, str]]:
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
        notes = method_notes(cfg)
        for name, values in varying.items():
            if i in values:
                value = values[i]
                notes.append(f"{name}={Path(value).name if name == 'model' else value}")
        rows.append((_order_key(label), bool(notes), ", ".join(notes), run.get("_path", ""), label, run))
    rows.sort(key=lambda r: r[:4])
    ppl_sets = _ordered({d for run in runs for d in (run.get("ppl") or {})}, PPL_ORDER)
    task_cols = _task_columns(runs)
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


def write_atomic(path, text: str) -> None:
    """Write text to path through a temporary file in the same directory and os.replace."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc}") from exc


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m eval.table", description=__doc__.split("\n\n")[0])
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
