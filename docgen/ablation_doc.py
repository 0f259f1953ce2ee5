"""Two sections of docs/results.md as markdown lines: weight-only binary coding (GPTQT, BCQ against RTN and
GPTQ) and the differences from the RPTQ reference (each alternative against the default), rendered from the
runs of docs/runs; a run not there yet shows as "not run"."""
from __future__ import annotations

import math
from statistics import mean

from docgen.doc_cells import NOT_RUN, calib_s, fmt, md_table, ppl_of, ratio
from docgen.doc_plan import DIFF_CONFIGS, DIFF_ITEMS, DYNAMIC_DEFAULT, WEIGHT_RUNS
from docgen.doc_stats import K, Spread, ppl_spread
from eval.runs import rptq_setting

SETS = ("ptb", "wiki_leads")


def _ppl_cells(run: dict | None, fp: dict | None) -> list[str]:
    cells = []
    for d in SETS:
        cells += [fmt(ppl_of(run, d)), ratio(ppl_of(run, d), ppl_of(fp, d))]
    return cells


# ---------------------------------------------------------------- weight-only binary coding
def _errors(run: dict) -> tuple[float | None, tuple[float, int] | None]:
    """Mean over layers and linears of the weight-only output error (rel MSE), and the worst block's output
    SQNR with its layer: a quantizer can lower the mean error yet break one block (e.g. by clipping the few
    largest weights), which the mean hides and the perplexity shows."""
    layers = run.get("layer_errors") or []
    errs = [v for layer in layers for v in (layer.get("weights") or {}).values()]
    sqnr = [(layer["block_sqnr_db"], layer["layer"]) for layer in layers
            if math.isfinite(layer.get("block_sqnr_db", math.nan))]
    return (mean(errs) if errs else None), (min(sqnr) if sqnr else None)


def _worst_cell(worst: tuple[float, int] | None) -> str:
    return f"{worst[0]:.1f} (layer {worst[1]})" if worst else "–"


def _error_cells(run: dict) -> list[str]:
    err, worst = _errors(run)
    return [f"{err:.4f}" if err is not None else "–", _worst_cell(worst)]


def _lower_error_higher_ppl(runs: dict[str, dict]) -> list[str]:
    """BCQ against RTN at the same bits and grouping, said where the mean weight error and the perplexity
    disagree: the mean error is then not what decides the model's quality."""
    out = []
    for bits in (3, 2):
        for group in ("", "-g128"):
            b, r = runs.get(f"weights/W{bits}-bcq{group}"), runs.get(f"weights/W{bits}-rtn{group}")
            if not (b and r):
                continue
            (eb, worst_b), (er, worst_r) = _errors(b), _errors(r)
            pb, pr = ppl_of(b, "ptb"), ppl_of(r, "ptb")
            if None in (eb, er, pb, pr) or not (eb < er and pb > pr):
                continue
            wb, wr = _worst_cell(worst_b), _worst_cell(worst_r)
            out.append(f"- {bits}-bit {'groups of 128' if group else 'per row'}: BCQ's mean weight error is below "
                       f"RTN's ({eb:.4f} vs {er:.4f}) yet its ptb perplexity is {ratio(pb, pr)} RTN's; its worst "
                       f"block's SQNR is {wb} against RTN's {wr}, in dB. BCQ fits its levels to the weight MSE, "
                       "which can clip a row's largest weights, and a few such weights can decide a block's output.")
    return out


def weights_section(runs: dict[str, dict], caveat: bool) -> list[str]:
    fp = runs.get("ppl/FP16")
    rows = [["FP16", "16", "–", "–", *_ppl_cells(fp, fp), "–", "–", calib_s(fp)]] if fp else []
    for key in WEIGHT_RUNS:
        run = runs.get(key)
        if run is None:
            rows.append([key.split("/")[1]] + [NOT_RUN] * 10)
            continue
        cfg = run["config"]
        group = cfg.get("w_group_size") or 0
        rows.append([f"W{cfg['wbits']}A{cfg['abits']}", str(cfg["wbits"]), str(cfg["w_quantizer"]).upper(),
                     f"{group}" if group else "per row", *_ppl_cells(run, fp), *_error_cells(run), calib_s(run)])
    out = md_table(["Run", "bits", "quantizer", "group", "ptb (ppl)", "×FP16", "wiki_leads (ppl)", "×FP16",
                    "weight error (mean rel MSE)", "worst block SQNR (dB)", "calib (s)"], rows, "lrllrrrrrrr")
    out += ["", "Weight error: each linear's output error from its quantized weights alone, relative to its output "
            "energy, averaged over linears and layers; worst block: the lowest output SQNR of a quantized block "
            "against the FP block on the same inputs (`layer_errors` of results.json).", ""]
    for bits in (3, 2):
        for group in ("", "-g128"):
            g, t = runs.get(f"weights/W{bits}-gptq{group}"), runs.get(f"weights/W{bits}-gptqt{group}")
            if g and t:
                cells = [f"{d} {ppl_of(t, d):.2f} vs {ppl_of(g, d):.2f} ({ratio(ppl_of(t, d), ppl_of(g, d))})"
                         for d in SETS if ppl_of(t, d) is not None and ppl_of(g, d) is not None]
                out.append(f"- {bits}-bit {'groups of 128' if group else 'per row'}: GPTQT vs GPTQ "
                           + "; ".join(cells) + " (one seed each).")
    out += _lower_error_higher_ppl(runs)
    if caveat:
        out += ["", "Caveat: SmolLM2's shipped weights already lie on a 4-bit grid (GGUF Q4_1, blocks of 32), so "
                "these 3- and 2-bit results measure re-quantizing a 4-bit model, not a native fp16 checkpoint."]
    return out


# ---------------------------------------------------------------- differences from the reference
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
        out += md_table([what, "mean rel MSE", "max", "at layer"],
                        [[n, f"{m:.2e}", f"{x:.2e}", str(layers[i]["layer"])] for n, m, x, i in rows]) + [""]
    sqnr = [layer["block_sqnr_db"] for layer in layers if math.isfinite(layer.get("block_sqnr_db", math.nan))]
    out.append(f"Block output SQNR (quantized block vs FP block on the same inputs): mean {mean(sqnr):.1f} dB, "
               f"min {min(sqnr):.1f} dB over {len(layers)} layers." if sqnr else "")
    return out


def beyond_spread(default: float | None, alt: float | None, seeds: Spread | None) -> str:
    """Whether an alternative moved the default's perplexity (both at seed 2, the same windows) by more than
    K × the spread the default shows over calibration seeds; the spread is unmeasured where it ran once."""
    if default is None or alt is None:
        return "–"
    if seeds is None or seeds.std is None:
        return "spread not measured (default: 1 seed)"
    if seeds.std == 0:  # a default the seed does not change says nothing of the single-seed alternative's noise
        return "spread not measured (default unchanged by the seed)"
    gap = abs(alt - default)
    verdict = "yes" if gap > K * seeds.std else "no"
    return f"{verdict}: {gap:.2f} {'>' if verdict == 'yes' else '≤'} {K:g} × {seeds.std:.2f}"


def diffs_section(runs: dict[str, dict]) -> list[str]:
    rows = []
    for config, default_key in DIFF_CONFIGS:
        for suffix, item, reference, key in DIFF_ITEMS:
            dyn = suffix == "a-dynamic-per-token"
            base = runs.get(f"diffs/{config}-{DYNAMIC_DEFAULT}" if dyn else default_key)
            alt = runs.get(f"diffs/{config}-{suffix}")
            ref_value = rptq_setting(base["config"], key) if base else "?"
            flag = f"diffs/{config}-{suffix}" if alt is None else (
                ("--a_dynamic " if dyn else "") + f"--{key} {rptq_setting(alt['config'], key)}")
            a, b = ppl_of(base, "ptb"), ppl_of(alt, "ptb")
            seeds = ppl_spread(runs, default_key, "ptb") if not dyn else None
            rows.append([config, item, f"{reference} (`{'--a_dynamic, ' if dyn else ''}{key}={ref_value}`)",
                         f"`{flag}`", fmt(a) if base else NOT_RUN, fmt(b) if alt else NOT_RUN, ratio(b, a),
                         beyond_spread(a, b, seeds)])
    out = md_table(["config", "item", "reference behaviour (our default)", "alternative", "ptb ppl default",
                    "ptb ppl alternative", "alt / default", f"gap > {K:g} × default's std over seeds?"], rows,
                   "llllrrrl")
    static = {c: ppl_of(runs.get(d), "ptb") for c, d in DIFF_CONFIGS}
    dyn = {c: ppl_of(runs.get(f"diffs/{c}-{DYNAMIC_DEFAULT}"), "ptb") for c, _ in DIFF_CONFIGS}
    out += ["", "One seed per run (seed 2, against the default's seed-2 run), PTB only; the last column sets the gap "
            "against the default's own spread over calibration seeds, where it ran with several. The dynamic rows "
            "compare two non-default runs; against static ranges (our default) the reference's --a_dynamic gives "
            + "; ".join(f"{c} {fmt(dyn[c])} vs {fmt(static[c])} ({ratio(dyn[c], static[c])})"
                        for c, _ in DIFF_CONFIGS) + " (ptb).", "",
            "Where the W4A4 error comes from (default run, `layer_errors` of results.json):", ""]
    return out + point_error_lines(runs.get("ppl/W4A4"))
