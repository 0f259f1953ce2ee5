"""Spread over calibration seeds for docs/results.md: a row's perplexity as mean ± standard deviation over
its seed runs (the base run and its `-seedN` repeats in docs/runs), and the rule by which the generated
observations call two rows different: only when their means differ by more than twice the larger spread."""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev

from docgen.doc_runs import EXTRA_SEEDS, seed_key

K = 2.0  # means must differ by more than K x the larger standard deviation


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1) over n seeds; std is None for a single seed."""
    mean: float
    std: float | None
    n: int


def seed_runs(runs: dict[str, dict], key: str) -> list[dict]:
    """The base run and the seed repeats of `key` that exist."""
    return [runs[k] for k in (key, *(seed_key(key, s) for s in EXTRA_SEEDS)) if k in runs]


def spread(values) -> Spread | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values:
        return None
    if not all(math.isfinite(v) for v in values):
        return Spread(max(values), None, len(values))
    return Spread(mean(values), stdev(values) if len(values) > 1 else None, len(values))


def ppl_spread(runs: dict[str, dict], key: str, dataset: str) -> Spread | None:
    return spread(((r.get("ppl") or {}).get(dataset) for r in seed_runs(runs, key)))


def fmt_spread(s: Spread | None, seeded: bool = True, spec: str = ".2f") -> str:
    """"157.04 ± 3.21" over several seeds; "157.04 (1 seed)" for one (`seeded` False: a run that calibrates
    nothing, where a seed changes nothing, gets no marker); "not run" for none."""
    if s is None:
        return "not run"
    text = format(s.mean, spec) if math.isfinite(s.mean) else str(s.mean)
    if s.std is not None:
        return f"{text} ± {s.std:{spec}}"
    return text + (" (1 seed)" if seeded else "")


def compare(a: Spread, b: Spread) -> tuple[bool | None, str]:
    """(different?, why): different when |mean a − mean b| > K × the larger std. With one seed on one side
    the other side's std is the only spread there is; with one seed on both there is none (None). A std of
    exactly 0 belongs to a row the seed does not change (a data-free rotation, say): it says nothing of the
    single-seed side's noise, so that pair is not judged either."""
    stds = [s.std for s in (a, b) if s.std is not None]
    gap = abs(a.mean - b.mean)
    if not stds:
        return None, f"|Δ| {gap:.2f}, no spread measured (1 seed each)"
    if len(stds) == 1 and stds[0] == 0:
        return None, f"|Δ| {gap:.2f}, no spread measured (one side 1 seed, the other unchanged by the seed)"
    larger = max(stds)
    note = "" if len(stds) == 2 else ", one side 1 seed"
    if gap > K * larger:
        return True, f"|Δ| {gap:.2f} > {K:g} × {larger:.2f}{note}"
    return False, f"|Δ| {gap:.2f} ≤ {K:g} × {larger:.2f}{note}"


def ranking(rows: list[tuple[str, Spread]], what: str) -> str:
    """One observation: the rows ordered by mean (lowest first), each compared with the one before it."""
    rows = sorted(((label, s) for label, s in rows if s is not None), key=lambda r: (r[1].mean, r[0]))
    if not rows:
        return ""
    parts = [f"{rows[0][0]} {fmt_spread(rows[0][1])}"]
    for (prev, ps), (label, s) in zip(rows, rows[1:]):
        different, why = compare(ps, s)
        verdict = {True: f"higher than {prev}", False: f"not different from {prev}",
                   None: f"not judged against {prev}"}[different]
        parts.append(f"{label} {fmt_spread(s)} ({verdict}: {why})")
    return f"- {what}, lowest first: " + "; ".join(parts) + "."
