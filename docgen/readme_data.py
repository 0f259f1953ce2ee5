"""The runs the README's generated blocks read, grouped by row: docs/runs/<section>/<run>/results.json, with
extra calibration seeds of a run beside it as <run>-seed3, <run>-seed4; a row's perplexity is the mean ± std
over its seeds, and the numbers are formatted here once for every block."""
from __future__ import annotations

from pathlib import Path

from docgen.doc_runs import base_key, read_plan
from docgen.doc_stats import Spread, spread
from eval.runs import load_runs

NOT_RUN = "not run"
Measure = Spread  # one definition of mean ± std over seeds, shared with docs/results.md


def load_tree(root) -> dict[str, list[dict]]:
    """{"section/run": [results.json dicts, one per seed, by seed]} for every results.json under root;
    {} when there are none (the README then says so rather than failing)."""
    root = Path(root)
    base = root.resolve() if root.is_dir() else root
    # the peer's runs (docgen.peer_runs) are not main.py's
    files = [p for p in sorted(base.rglob("results.json")) if p.relative_to(base).parts[0] != "peer"]
    if not files:
        return {}
    plan = {key: cmd for _, _, key, cmd in read_plan(root)}
    grouped: dict[str, list[dict]] = {}
    for run in load_runs(files):
        rel = Path(run["_path"]).parent.relative_to(base).as_posix()
        command = Path(run["_path"]).with_name("command.txt")
        if rel in plan and (not command.is_file() or command.read_text().strip() != plan[rel]):
            continue  # run with other settings than the plan's: docs/results.md leaves it out too
        grouped.setdefault(base_key(rel), []).append(run)
    for runs in grouped.values():
        runs.sort(key=lambda r: (r["config"].get("seed") or 0, r["_path"]))
    return grouped


def measure(runs: list[dict] | None, dataset: str) -> Measure | None:
    """The runs' perplexity on dataset over their seeds (None when no run has one)."""
    return spread((r.get("ppl") or {}).get(dataset) for r in runs or ())


def number(value: float) -> str:
    """Two decimals; exponent notation once a perplexity has blown up (a collapsed run)."""
    return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.1e}"


def show(m: Measure | None, base: Measure | None = None) -> str:
    """'157.04', '157.04 (×2.27)' against base, '157.04 ± 3.10 (×2.27; 3 seeds)', or NOT_RUN."""
    if m is None:
        return NOT_RUN
    text = number(m.mean) + (f" ± {number(m.std)}" if m.std is not None else "")
    notes = ([ratio(m, base)] if base is not None else []) + ([f"{m.n} seeds"] if m.n > 1 else [])
    return text + (f" ({'; '.join(notes)})" if notes else "")


def ratio(m: Measure, base: Measure) -> str:
    """The ratio of the means, as ×1.23."""
    return f"×{m.mean / base.mean:.2f}"


def settings_line(runs: list[dict]) -> str:
    """The calibration and evaluation windows the calibrated runs used, or that they differ."""
    keys = ("calib_dataset", "nsamples", "seqlen", "seed", "limit")
    calibrated = [r["config"] for r in runs if r["config"]["wbits"] < 16 or r["config"]["abits"] < 16]
    seen = {tuple(c.get(k) for k in keys if k != "seed") for c in calibrated}
    if not seen:
        return ""
    if len(seen) > 1:
        return "the runs differ in their calibration or evaluation windows (see docs/results.md)"
    calib, nsamples, seqlen, limit = next(iter(seen))
    seeds = sorted({c.get("seed") for c in calibrated})
    windows = "every window" if limit in (None, -1) else f"the first {limit} windows"
    return (f"calibration: {nsamples} windows × {seqlen} tokens of {calib} train, seed "
            f"{', '.join(map(str, seeds))}; evaluation: {windows} × {seqlen} tokens of each set")
