"""The runs the README's generated blocks read, grouped by row: docs/runs/<section>/<run>/results.json, with
extra calibration seeds of a run beside it as <run>-seed3, <run>-seed4; a row's perplexity is the mean ± std
over its seeds, and the numbers are formatted here once for every block."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from eval.runs import load_runs

NOT_RUN = "not run"
_SEED = re.compile(r"-seed\d+$")  # <run>-seed3: the same row calibrated with another seed


def load_tree(root) -> dict[str, list[dict]]:
    """{"section/run": [results.json dicts, one per seed, by seed]} for every results.json under root;
    {} when there are none (the README then says so rather than failing)."""
    root = Path(root)
    if not root.is_dir() or not any(root.rglob("results.json")):
        return {}
    base = root.resolve()
    grouped: dict[str, list[dict]] = {}
    for run in load_runs(root):
        rel = Path(run["_path"]).parent.relative_to(base).as_posix()
        grouped.setdefault(_SEED.sub("", rel), []).append(run)
    for runs in grouped.values():
        runs.sort(key=lambda r: (r["config"].get("seed") or 0, r["_path"]))
    return grouped


@dataclass(frozen=True)
class Measure:
    """A perplexity over the seeds that measured it: mean, sample std (None for one seed), seed count."""
    mean: float
    std: float | None
    n: int


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measure(runs: list[dict] | None, dataset: str) -> Measure | None:
    """The runs' perplexity on dataset (None when no run has a finite one)."""
    values = [r["ppl"][dataset] for r in runs or () if _finite((r.get("ppl") or {}).get(dataset))]
    if not values:
        return None
    return Measure(mean(values), stdev(values) if len(values) > 1 else None, len(values))


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
