"""The methods section of docs/results.md as markdown lines: every method's row side by side (perplexity as
mean ± std over calibration seeds where a row ran several), the generated comparisons under the 2× spread rule,
FPTQ's layerwise decisions and the rotations' channel-range ratios; every number read from docs/runs."""
from __future__ import annotations

from statistics import mean

from docgen.doc_cells import MISSING, NOT_RUN, calib_s, fmt, md_table, method_text, ratio
from docgen.doc_plan import METHOD_ROWS, ROTATION_RUNS, SEEDED
from docgen.doc_stats import fmt_spread, ppl_spread, ranking, seed_runs
from eval.runs import method_settings, row_label

SETS = ("ptb", "wiki_leads")


def fptq_lines(run: dict | None) -> list[str]:
    """Per point, how many layers FPTQ's layerwise rule sent to each strategy, and r = max|X| over layers."""
    per_point: dict[str, list[dict]] = {}
    for layer in (run or {}).get("decisions") or []:
        for point, d in (layer.get("points") or {}).items():
            if isinstance(d, dict) and "strategy" in d:
                per_point.setdefault(point, []).append(d)
    if not per_point:
        return ["(no FPTQ decisions recorded)"]
    known = ("static", "lae+static", "dynamic")
    seen = {d["strategy"] for ds in per_point.values() for d in ds}
    strategies = [s for s in known if s in seen] + sorted(seen - set(known))
    rows = [[p] + [str(sum(d["strategy"] == s for d in ds)) for s in strategies]
            + [fmt(mean(d["r"] for d in ds), ".1f"), fmt(max(d["r"] for d in ds), ".1f")]
            for p, ds in per_point.items()]
    rows.append(["all"] + [str(sum(d["strategy"] == s for ds in per_point.values() for d in ds))
                           for s in strategies] + ["", ""])
    v = method_settings(run["config"], "fptq")
    return ([f"FPTQ's layerwise decisions over {len(run['decisions'])} layers (r = calibration max|X| of the "
             f"point before LAE; v0 = {v.get('v0')}, v1 = {v.get('v1')}); counts are layers:", ""]
            + md_table(["point"] + strategies + ["mean r", "max r"], rows))


def rotation_lines(runs: dict[str, dict]) -> list[str]:
    """Per linear input, max/mean of the per-channel absmax before and after the rotation step, averaged
    over layers: how much the rotation flattened the outlier channels."""
    cols = [(k, runs[k]) for k in ROTATION_RUNS if k in runs]
    points: dict[str, dict[str, list]] = {}
    for key, run in cols:
        for layer in run.get("decisions") or []:
            for point, d in (layer.get("points") or {}).items():
                rot = d.get("rotate") if isinstance(d, dict) else None
                if rot:
                    points.setdefault(point, {}).setdefault(key, []).append(rot)
    if not points:
        return ["(no rotation decisions recorded)"]
    rows = []
    for point, by_run in points.items():
        cells = []
        for key, _ in cols:
            rots = by_run.get(key) or []
            cells.append(f"{mean(r['range_ratio_before'] for r in rots):.1f} → "
                         f"{mean(r['range_ratio_after'] for r in rots):.1f}" if rots else MISSING)
        rows.append([point] + cells)
    rotation = {key: method_settings(run["config"], "duquant") for key, run in cols}
    steps = ", ".join(f"{key.split('/')[1]} " + (f"{r.get('steps')} greedy steps" if r.get("kind") == "duquant"
                                                 else f"{r.get('kind')}, no search") for key, r in rotation.items())
    return (["Channel-range ratio max_j m_j / mean_j m_j (m_j = calibration absmax of channel j, on the rotation "
             "search's token sample) before → after the rotation step, mean over layers "
             f"({steps}):",
             ""]
            + md_table(["point"] + [k.split("/")[1] for k, _ in cols], rows))


def methods_section(runs: dict[str, dict]) -> list[str]:
    fp = runs.get("ppl/FP16")
    rows, labels, spreads = [], {}, {}
    for key, what in METHOD_ROWS:
        run = runs.get(key)
        labels[key] = f"{row_label(run['config']) if run else key.split('/')[1]} {what}".strip()
        calibrated = bool(run) and row_label(run["config"]) != "FP16"
        cells = []
        for d in SETS:
            spreads[key, d] = s = ppl_spread(runs, key, d)
            fp_mean = ppl_spread(runs, "ppl/FP16", d)
            cells += [fmt_spread(s, calibrated), ratio(s.mean, fp_mean.mean) if s and fp_mean else MISSING]
        seeds = sorted({r["config"].get("seed") for r in seed_runs(runs, key)})
        rows.append([labels[key], *cells, ", ".join(map(str, seeds)) if calibrated else "–", calib_s(run),
                     method_text(run) if run else NOT_RUN])
    header = ["Run", "ptb (ppl)", "×FP16", "wiki_leads (ppl)", "×FP16", "seeds", "calib (s)",
              "method (from results.json)"]
    rotations = [method_settings(runs[k]["config"], "duquant") for k in ROTATION_RUNS if k in runs]
    steps = {r.get("steps") for r in rotations if r.get("kind") == "duquant"}
    out = md_table(header, rows, "lrrrrlrl") + [""]
    out += ["Perplexity cells: mean ± sample standard deviation (n − 1) over the calibration seeds listed (the "
            "seed draws the calibration windows and seeds k-means and the rotations); \"(1 seed)\" marks a row "
            "with one run; ×FP16 divides the mean by FP16's. Rows run with three seeds: "
            + ", ".join(labels[k] for k in SEEDED if k in labels) + ".", ""]
    if steps:
        out += [f"DuQuant ran {', '.join(map(str, sorted(steps)))} greedy rotation steps per block (the script's "
                "ROT_STEPS; the paper's default is 256, fewer here to fit a shared 2-core CPU).", ""]
    out += ["Observations (generated; two rows are called different only when their means differ by more than "
            "twice the larger of their standard deviations over seeds):", ""]
    groups = (("W4A4", lambda c: (c["wbits"], c["abits"]) == (4, 4) and not c.get("only_quant_kv")),
              ("W4A8 / W8A8 / W4A16", lambda c: (c["wbits"], c["abits"]) in ((4, 8), (8, 8), (4, 16))))
    for name, member in groups:
        keys = [k for k, _ in METHOD_ROWS if k in runs and member(runs[k]["config"])]
        for d in SETS:
            line = ranking([(labels[k], spreads[k, d]) for k in keys], f"{name} {d} perplexity")
            out += [line] if line else []
    return out + [""] + fptq_lines(runs.get("methods/W4A8-fptq")) + [""] + rotation_lines(runs)
