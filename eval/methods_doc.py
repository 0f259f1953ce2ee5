"""The side-by-side sections of docs/results.md as markdown lines: methods, weight-only binary coding,
differences from the reference; rendered from the results.json files of scripts/make_results_doc.sh (every
number read from them). The run keys of every section live here; the figures are eval.doc_figures'.

Runs are keyed "sub/name" as the script lays them out under OUT (e.g. "methods/W4A4-duquant"); rows whose
run is absent render as "–" (results_doc refuses to render a requested section with runs missing)."""
from __future__ import annotations

import math
from statistics import mean

from eval.runs import row_label

SETS = ("ptb", "wiki_leads")
MISSING = "–"
PAPER = ("FP16", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV",
         "W4A4-per-tensor", "W4A4-uniform", "W4A4-uniform-per-tensor")
# Section A: (run, what the method is); the bit setting is prefixed from the run's own config.
METHOD_ROWS = (
    ("ppl/FP16", ""),
    ("methods/W8A8-smoothquant", "SmoothQuant (static per-tensor activations)"),
    ("methods/W8A8-smoothquant-per-token", "SmoothQuant, per-token dynamic activations"),
    ("methods/W4A8-fptq", "FPTQ"),
    ("methods/W4A8-fptq-gptq", "FPTQ with GPTQ weights (the paper's Table 7 ablation)"),
    ("ppl/W4A8", "RPTQ"),
    ("methods/W4A8-naive", "naive: per-tensor static activations, RTN weights"),
    ("methods/W4A16-g128-rtn", "RTN weights in groups of 128"),
    ("ppl/W4A4", "RPTQ"),
    ("ppl/W4A4-uniform", "RPTQ, uniform policy (every activation at 4 bits)"),
    ("ppl/W4A4-per-tensor", "per-tensor (no reorder)"),
    ("methods/W4A4-duquant", "DuQuant"),
    ("methods/W4A4-rotation", "plain block-Hadamard rotation"),
    ("methods/W4A4-duquant-clusters", "DuQuant rotations + RPTQ clusters, static (experiment)"),
)
ROTATION_RUNS = ("methods/W4A4-duquant", "methods/W4A4-rotation", "methods/W4A4-duquant-clusters")
# Section B: weight-only; (bits, quantizer, group size) per run name.
WEIGHT_RUNS = tuple(f"weights/W{b}-{q}" for b in (3, 2) for q in ("rtn", "gptq", "gptqt", "bcq", "gptq-g128",
                                                                 "gptqt-g128"))
# Section C: (alternative run suffix, item, the reference's behaviour, config key); the default run is the
# paper row, except for dynamic ranges, whose "default" is the reference's --a_dynamic.
DIFF_CONFIGS = (("W4A4", "ppl/W4A4"), ("W4A3KV", "ppl/W4A3KV"))
DIFF_ITEMS = (
    ("grid-full", "integer grid", "2^b levels over [min, max − step]", "grid"),
    ("w-range-with-zero", "weight range", "plain per-group min/max (0 need not be on the grid)", "w_range"),
    ("metric-ema-channel", "static activation ranges", "EMA over samples of each sample's cluster extreme",
     "metric"),
    ("metric-minmax", "static activation ranges", "EMA over samples of each sample's cluster extreme", "metric"),
    ("metric-mse", "static activation ranges", "EMA over samples of each sample's cluster extreme", "metric"),
    ("metric-layer-mse", "static activation ranges", "EMA over samples of each sample's cluster extreme",
     "metric"),
    ("kmeans-metric", "k-means features", "each channel's global min/max", "kmeans_features"),
    ("a-dynamic-per-token", "dynamic ranges (`--a_dynamic`)", "one range per cluster and sequence",
     "a_dynamic_method"),
)
DYNAMIC_DEFAULT = "a-dynamic"
SECTION_RUNS = {
    "paper": tuple(f"ppl/{r}" for r in PAPER),
    "methods": tuple(r for r, _ in METHOD_ROWS),
    "weights": ("ppl/FP16",) + WEIGHT_RUNS,
    "diffs": tuple(d for _, d in DIFF_CONFIGS) + tuple(
        f"diffs/{c}-{s}" for c, _ in DIFF_CONFIGS for s in (DYNAMIC_DEFAULT,) + tuple(i[0] for i in DIFF_ITEMS)),
    "tasks": ("tasks/FP16", "tasks/W4A4", "tasks/W4A4-per-tensor"),
    "ref": ("ref/fp16-5x512",),
}


def fmt(value, spec: str = ".2f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return format(value, spec) if math.isfinite(value) else str(value)


def ratio(a, b) -> str:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)) and b
    return f"×{a / b:.2f}" if ok else MISSING


def ppl_of(run: dict | None, dataset: str):
    return ((run or {}).get("ppl") or {}).get(dataset)


def calib_s(run: dict | None) -> str:
    return fmt(((run or {}).get("timing") or {}).get("calibration_s"), ".0f")


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
    if "reorder" in (m.get("transforms") or []) and cfg.get("reorder") == "":
        transforms = transforms.replace("reorder", "reorder(off)")
    group = cfg.get("w_group_size") or 0
    weights = "none" if w >= 16 else (f"{m.get('weight_quantizer', cfg.get('w_quantizer'))} {m.get('grid', '')} "
                                      + (f"g{group}" if group else "per row/cluster"))
    return f"{m.get('name', cfg.get('method', '?'))}: transforms {transforms}; acts {acts}; weights {weights}"


def _table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Markdown table; align has an l (text) or r (number) per column, default: text, then numbers."""
    align = align or "l" + "r" * (len(header) - 1)
    return (["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
            + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


def _ppl_cells(run: dict | None, fp: dict | None) -> list[str]:
    cells = []
    for d in SETS:
        cells += [fmt(ppl_of(run, d)), ratio(ppl_of(run, d), ppl_of(fp, d))]
    return cells


# ---------------------------------------------------------------- A. methods side by side
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
    v = run["config"].get("fptq") or {}
    return ([f"FPTQ's layerwise decisions over {len(run['decisions'])} layers (r = calibration max|X| of the "
             f"point before LAE; v0 = {v.get('v0')}, v1 = {v.get('v1')}); counts are layers:", ""]
            + _table(["point"] + strategies + ["mean r", "max r"], rows))


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
    rotation = {key: run["config"].get("rotation") or {} for key, run in cols}
    steps = ", ".join(f"{key.split('/')[1]} " + (f"{r.get('steps')} greedy steps" if r.get("kind") == "duquant"
                                                 else f"{r.get('kind')}, no search") for key, r in rotation.items())
    return (["Channel-range ratio max_j m_j / mean_j m_j (m_j = calibration absmax of channel j, on the rotation "
             "search's token sample) before → after the rotation step, mean over layers "
             f"({steps}):",
             ""]
            + _table(["point"] + [k.split("/")[1] for k, _ in cols], rows))


def methods_section(runs: dict[str, dict]) -> list[str]:
    fp = runs.get("ppl/FP16")
    rows, labels = [], {}
    for key, what in METHOD_ROWS:
        run = runs.get(key)
        labels[key] = f"{row_label(run['config']) if run else key.split('/')[1]} {what}".strip()
        rows.append([labels[key], *_ppl_cells(run, fp), calib_s(run), method_text(run)])
    header = ["Run", "ptb (ppl)", "×FP16", "wiki_leads (ppl)", "×FP16", "calib (s)", "method (from results.json)"]
    rotations = [runs[k]["config"].get("rotation") or {} for k in ROTATION_RUNS if k in runs]
    steps = {r.get("steps") for r in rotations if r.get("kind") == "duquant"}
    out = _table(header, rows, "lrrrrrl") + [""]
    if steps:
        out += [f"DuQuant ran {', '.join(map(str, sorted(steps)))} greedy rotation steps per block (the script's "
                "ROT_STEPS; the paper's default is 256, fewer here to fit a shared 2-core CPU).", ""]
    w4a4 = [k for k, _ in METHOD_ROWS if k in runs and (runs[k]["config"]["wbits"], runs[k]["config"]["abits"])
            == (4, 4) and not runs[k]["config"].get("only_quant_kv")]
    for d in SETS:
        got = {k: ppl_of(runs[k], d) for k in w4a4 if ppl_of(runs[k], d) is not None}
        if got:
            best = min(got, key=got.get)
            out.append(f"- Lowest W4A4 {d} perplexity: {labels[best]} {got[best]:.2f} "
                       f"({ratio(got[best], ppl_of(fp, d))} FP16).")
    return out + [""] + fptq_lines(runs.get("methods/W4A8-fptq")) + [""] + rotation_lines(runs)


# ---------------------------------------------------------------- B. weight-only binary coding
def weights_section(runs: dict[str, dict], caveat: bool) -> list[str]:
    fp = runs.get("ppl/FP16")
    rows = [["FP16", "16", "–", "–", *_ppl_cells(fp, fp), calib_s(fp)]] if fp else []
    for key in WEIGHT_RUNS:
        run = runs.get(key)
        if run is None:
            rows.append([key.split("/")[1]] + [MISSING] * 8)
            continue
        cfg = run["config"]
        group = cfg.get("w_group_size") or 0
        rows.append([f"W{cfg['wbits']}A{cfg['abits']}", str(cfg["wbits"]), str(cfg["w_quantizer"]).upper(),
                     f"{group}" if group else "per row", *_ppl_cells(run, fp), calib_s(run)])
    out = _table(["Run", "bits", "quantizer", "group", "ptb (ppl)", "×FP16", "wiki_leads (ppl)", "×FP16",
                  "calib (s)"], rows, "lrllrrrrr") + [""]
    for bits in (3, 2):
        for group in ("", "-g128"):
            g, t = runs.get(f"weights/W{bits}-gptq{group}"), runs.get(f"weights/W{bits}-gptqt{group}")
            if g and t:
                cells = [f"{d} {ppl_of(t, d):.2f} vs {ppl_of(g, d):.2f} ({ratio(ppl_of(t, d), ppl_of(g, d))})"
                         for d in SETS if ppl_of(t, d) is not None and ppl_of(g, d) is not None]
                out.append(f"- {bits}-bit {'groups of 128' if group else 'per row'}: GPTQT vs GPTQ "
                           + "; ".join(cells) + ".")
    if caveat:
        out += ["", "Caveat: SmolLM2's shipped weights already lie on a 4-bit grid (GGUF Q4_1, blocks of 32), so "
                "these 3- and 2-bit results measure re-quantizing a 4-bit model, not a native fp16 checkpoint."]
    return out


# ---------------------------------------------------------------- C. differences from the reference
def point_error_lines(run: dict | None) -> list[str]:
    """Mean (over layers) relative MSE of each quantized activation point and each linear's weights."""
    layers = (run or {}).get("layer_errors") or []
    if not layers:
        return ["(no per-layer errors recorded)"]
    out = []
    for field, what in (("points", "activation point (quantized / FP input energy)"),
                        ("weights", "linear (weight-only output error / output energy)")):
        values: dict[str, list[float]] = {}
        for layer in layers:
            for name, v in (layer.get(field) or {}).items():
                values.setdefault(name, []).append(v)
        rows = sorted(([n, mean(v), max(v), v.index(max(v))] for n, v in values.items()), key=lambda r: -r[1])
        out += _table([what, "mean rel MSE", "max", "at layer"],
                      [[n, f"{m:.2e}", f"{x:.2e}", str(layers[i]["layer"])] for n, m, x, i in rows]) + [""]
    sqnr = [layer["block_sqnr_db"] for layer in layers if math.isfinite(layer.get("block_sqnr_db", math.nan))]
    out.append(f"Block output SQNR (quantized block vs FP block on the same inputs): mean {mean(sqnr):.1f} dB, "
               f"min {min(sqnr):.1f} dB over {len(layers)} layers." if sqnr else "")
    return out


def diffs_section(runs: dict[str, dict]) -> list[str]:
    rows = []
    for config, default_key in DIFF_CONFIGS:
        for suffix, item, reference, key in DIFF_ITEMS:
            dyn = suffix == "a-dynamic-per-token"
            base = runs.get(f"diffs/{config}-{DYNAMIC_DEFAULT}" if dyn else default_key)
            alt = runs.get(f"diffs/{config}-{suffix}")
            if alt is None:  # not run (listed under the section)
                continue
            ref_value = base["config"].get(key) if base else "?"
            alt_value = alt["config"].get(key) if alt else "?"
            flag = ("--a_dynamic " if dyn else "") + f"--{key} {alt_value}"
            a, b = ppl_of(base, "ptb"), ppl_of(alt, "ptb")
            rows.append([config, item, f"{reference} (`{'--a_dynamic, ' if dyn else ''}{key}={ref_value}`)",
                         f"`{flag}`", fmt(a), fmt(b), ratio(b, a)])
    out = _table(["config", "item", "reference behaviour (our default)", "alternative", "ptb ppl default",
                  "ptb ppl alternative", "alt / default"], rows, "llllrrr")
    static = {c: ppl_of(runs.get(d), "ptb") for c, d in DIFF_CONFIGS}
    dyn = {c: ppl_of(runs.get(f"diffs/{c}-{DYNAMIC_DEFAULT}"), "ptb") for c, _ in DIFF_CONFIGS}
    out += ["", "The dynamic rows compare two non-default runs; against static ranges (our default) the reference's "
            "--a_dynamic gives " + "; ".join(f"{c} {fmt(dyn[c])} vs {fmt(static[c])} ({ratio(dyn[c], static[c])})"
                                             for c, _ in DIFF_CONFIGS) + " (ptb).", "",
            "Where the W4A4 error comes from (default run, `layer_errors` of results.json):", ""]
    return out + point_error_lines(runs.get("ppl/W4A4"))
