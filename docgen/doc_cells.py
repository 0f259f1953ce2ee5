"""Cells and tables of docs/results.md: numbers, ratios, a run's perplexity and calibration time, what a
run's preset expanded to, and the markdown table they go in (every value read from a results.json)."""
from __future__ import annotations

import math

from eval.runs import rptq_setting

MISSING = "–"
NOT_RUN = "not run"


def fmt(value, spec: str = ".2f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return format(value, spec) if math.isfinite(value) else str(value)


def ratio(a, b) -> str:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)) and b
    if not ok:
        return MISSING
    r = a / b
    return f"×{r:.2f}" if r == 0 or abs(r) >= 0.01 else f"×{r:.1e}"  # a collapsed reference: keep the digits


def ppl_of(run: dict | None, dataset: str):
    return ((run or {}).get("ppl") or {}).get(dataset)


def calib_s(run: dict | None) -> str:
    return fmt(((run or {}).get("timing") or {}).get("calibration_s"), ".0f")


def md_table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Markdown table; align has an l (text) or r (number) per column, default: text, then numbers."""
    align = align or "l" + "r" * (len(header) - 1)
    return (["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
            + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


def method_text(run: dict | None) -> str:
    """What the run's preset expanded to, as results.json's "method" and config record it."""
    if not run:
        return MISSING
    m, cfg = run.get("method") or {}, run["config"]
    w, a = cfg["wbits"], cfg["abits"]
    if w >= 16 and a >= 16:
        return "full precision"
    acts = "none" if a >= 16 else m.get("activation_policy", cfg.get("abits_policy", "?"))
    if a < 16 and cfg.get("a_dynamic"):  # only RPTQ's policies have a per-cluster (per-sequence) dynamic form
        per_token = acts not in ("rptq", "uniform") or cfg.get("a_dynamic_method") == "per_token"
        acts += " dynamic per " + ("token" if per_token else "cluster and sequence")
    transforms = "+".join(m.get("transforms") or []) or "none"
    if "reorder" in (m.get("transforms") or []) and rptq_setting(cfg, "reorder") == "":
        transforms = transforms.replace("reorder", "reorder(off)")
    group = cfg.get("w_group_size") or 0
    weights = "none" if w >= 16 else (f"{m.get('weight_quantizer', cfg.get('w_quantizer'))} {m.get('grid', '')} "
                                      + (f"g{group}" if group else "per row/cluster"))
    return f"{m.get('name', cfg.get('method', '?'))}: transforms {transforms}; acts {acts}; weights {weights}"
