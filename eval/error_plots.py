"""Charts that compare runs: the per-layer quantization error (block output, weight-only, activation-only)
and perplexity per run and dataset. Each function returns its Figure and saves it atomically when given
a path."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.errors import UserError
from eval.figures import finish, new_figure, run_colors

PPL_FIRST = ("wikitext2", "ptb", "c4")
METRICS = ("sqnr_db", "rel_mse")


# ---------------------------------------------------------------- per-layer error
def _rel_to_metric(rel: np.ndarray, metric: str) -> np.ndarray:
    if metric == "rel_mse":
        return rel
    with np.errstate(divide="ignore"):
        return -10.0 * np.log10(rel)  # rel 0 -> +inf: an exact layer has no finite SQNR


def _series(layer_errors: list[dict], detail: bool) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{panel: {curve name: (layers, rel)}}; without detail, weights and points are averaged per layer."""
    rows = sorted(layer_errors, key=lambda e: e["layer"])
    out = {"block": {"": (np.array([r["layer"] for r in rows]), np.array([r["block_rel_mse"] for r in rows], float))}}
    for panel in ("weights", "points"):
        names = sorted({k for r in rows for k in (r.get(panel) or {})})
        if not names:
            continue
        if detail:
            out[panel] = {n: (np.array([r["layer"] for r in rows if n in (r.get(panel) or {})]),
                              np.array([r[panel][n] for r in rows if n in (r.get(panel) or {})], float))
                          for n in names}
        else:
            has = [r for r in rows if r.get(panel)]
            out[panel] = {"": (np.array([r["layer"] for r in has]),
                               np.array([np.mean(list(r[panel].values())) for r in has], float))}
    return out


_PANEL_TITLES = {"block": "block output vs FP block (same inputs)",
                 "weights": "weight-only: linear output error", "points": "activation-only: quantization error at each point"}


def plot_layer_errors(runs, path=None, metric: str = "sqnr_db", title: str | None = None,
                      detail: bool = False, colors: dict | None = None) -> Figure:
    """Per-layer error curves, runs overlaid. runs: [(label, layer_errors)] with results.json's
    layer_errors entries. Panels: the block's output error, and where recorded the weight-only and
    activation-only errors (mean over linears / points; with detail=True one curve per linear /
    point, meant for a single run). colors: {label: colour}, by default one per run. SQNR is
    computed from block_rel_mse (-10 log10), so an exact layer is +inf dB and is left out with a
    note in the legend; relative MSE uses a symlog axis whose linear part holds 0, so an
    unquantized run is drawn as 0 without log(0)."""
    if metric not in METRICS:
        raise UserError(f"unknown error metric {metric!r}; use one of {', '.join(METRICS)}")
    series = [(label, _series(errs, detail)) for label, errs in runs if errs]
    if not series:
        raise UserError("no run has layer_errors to plot")
    panels = [p for p in ("block", "weights", "points") if any(p in s for _, s in series)]
    colors = colors or run_colors(label for label, _ in series)
    fig = new_figure(12, 1.2 + 3.3 * len(panels))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    ylabel = "SQNR (dB, higher is better)" if metric == "sqnr_db" else "relative MSE ‖Q−F‖²/‖F‖²"
    for ax, panel in zip(axes, panels):
        drawn = []
        for label, s in series:
            for name, (layers, rel) in s.get(panel, {}).items():
                y = _rel_to_metric(rel, metric)
                exact = ~np.isfinite(y)
                text = " · ".join(t for t in (label, name) if t)
                if exact.any():
                    text += " (error 0 at all layers: SQNR ∞)" if exact.all() else f" (SQNR ∞ at {exact.sum()} layers)"
                style = {} if detail else {"color": colors.get(label)}  # detail: one colour per linear
                line, = ax.plot(layers, np.where(exact, np.nan, y), marker="o", ms=3.5, lw=1.4, label=text, **style)
                line.set_gid(f"{panel}:{text}")
                drawn.append(y[~exact])
        values = np.concatenate(drawn) if drawn else np.zeros(0)
        if metric == "rel_mse":
            _log_axis_with_zero(ax, values)
        ax.set_ylabel(ylabel)
        ax.set_title(_PANEL_TITLES[panel] + ("" if detail or panel == "block" else " (mean per layer)"), fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1].set_xlabel("decoder layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "Per-layer quantization error", fontsize=12)
    return finish(fig, path)


def _log_axis_with_zero(ax, values: np.ndarray) -> None:
    positive = values[values > 0]
    if len(positive) and len(positive) == len(values):
        ax.set_yscale("log")
        return
    if not len(positive):  # every layer exact (an unquantized run): a plain axis with the zeros on it
        ax.set_ylim(-0.02, 1.0)
        return
    floor = 10.0 ** math.floor(math.log10(positive.min())) if len(positive) else 1e-6
    ax.set_yscale("symlog", linthresh=floor)  # linear in [0, floor]: zeros stay drawable
    ax.set_ylim(bottom=0.0)


# ---------------------------------------------------------------- perplexity
def plot_ppl_chart(runs, path=None, title: str | None = None, colors: dict | None = None) -> Figure:
    """Grouped bars: one group per dataset, one bar per run (runs: [(label, {dataset: ppl})]),
    value written on each bar; log scale when the largest perplexity is more than 10x the smallest."""
    colors = colors or run_colors(label for label, _ in runs)
    runs = [(label, {d: v for d, v in (ppl or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)})
            for label, ppl in runs]
    sets = {d for _, ppl in runs for d in ppl}
    datasets = [d for d in PPL_FIRST if d in sets] + sorted(sets - set(PPL_FIRST))
    if not datasets:
        raise UserError("no run has a finite perplexity to chart")
    values = [v for _, ppl in runs for v in ppl.values()]
    log = min(values) > 0 and max(values) / min(values) > 10
    fig = new_figure(12, 5.2)
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, (label, ppl) in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, d in enumerate(datasets) if d in ppl]
        hs = [ppl[d] for d in datasets if d in ppl]
        bars = ax.bar(xs, hs, width * 0.92, label=label, color=colors.get(label), gid=f"run{i}")
        ax.bar_label(bars, [f"{h:.2f}" if h < 1000 else f"{h:.3g}" for h in hs], fontsize=8, padding=1,
                     rotation=90 if len(runs) > 4 else 0)
    ax.set_xticks(range(len(datasets)), datasets)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_xlabel("evaluation dataset")
    ax.set_ylabel("perplexity (lower is better" + (", log scale)" if log else ")"))
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "Perplexity per run")
    ax.grid(True, axis="y", alpha=0.3)
    return finish(fig, path)
