"""Activation-range pictures of one run: per-channel [min, max] of an activation point before and after a
method's transform (RPTQ's Figure 1), and the cluster layout of its reorder points; drawn from plot data
(eval.plot_data). Each function returns its Figure and saves it atomically when given a path."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from common.errors import UserError
from eval.figures import finish, new_figure
from eval.plot_data import check_plot_data, vector

BEFORE, AFTER, RANGE = "#7f7f7f", "#1f77b4", "#d62728"


# ---------------------------------------------------------------- channel ranges (RPTQ Fig. 1)
def _band(ax, lo: np.ndarray, hi: np.ndarray, color: str, label: str, gid: str, alpha: float) -> None:
    """Channel i is a bar from its min to its max over [i, i+1): the paper's picture, and at
    thousands of channels it reads as a band whose spikes are the outlier channels."""
    ax.stairs(hi, np.arange(len(hi) + 1), baseline=lo, fill=True, facecolor=color, edgecolor=color,
              lw=0.6, alpha=alpha, label=label, gid=gid)  # the edge keeps a 1-channel spike >= 1 px wide
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlim(0, len(hi))
    ax.set_ylabel("activation value")


def _ylim(ax, *arrays) -> None:
    """Autoscaling ignores a StepPatch's array baseline, so the lowest bars would be cut off."""
    lo, hi = min(float(np.min(a)) for a in arrays), max(float(np.max(a)) for a in arrays)
    pad = 0.06 * max(hi - lo, 1e-12)
    ax.set_ylim(lo - pad, hi + pad)


def _clusters(ax, sizes: np.ndarray, gmin, gmax) -> None:
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if len(ends) > 1:
        ax.vlines(ends[:-1], 0, 1, transform=ax.get_xaxis_transform(), colors="black", lw=0.7,
                  linestyles=":", label=f"cluster boundary ({len(sizes)} clusters)", gid="cluster_boundaries")
    if gmin is not None:
        ax.hlines(gmax, starts, ends, colors=RANGE, lw=1.8, label="cluster quantization\nrange [min, max]",
                  gid="cluster_max")
        ax.hlines(gmin, starts, ends, colors=RANGE, lw=1.8, gid="cluster_min")


def plot_channel_ranges(data: dict, meta: dict, path=None) -> Figure:
    """Per-channel [min, max] of one activation point over the calibration tokens, before the
    transform (original channel order) and after it. A reorder gets two panels, the second in
    cluster order with cluster boundaries and each cluster's quantization range; a scale or
    rotation draws before and after overlaid on the same axes (same channel index)."""
    check_plot_data(data, f"layer {meta.get('layer')} point {meta.get('point')}")
    bmin, bmax = vector(data, "before_min"), vector(data, "before_max")
    amin, amax = vector(data, "after_min"), vector(data, "after_max")
    transform = str(meta.get("transform") or "none")
    steps = transform.split("+")
    sizes = vector(data, "group_sizes", np.int64) if "group_sizes" in data else None
    has_range = sizes is not None and "group_min" in data and "group_max" in data
    gmin, gmax = (vector(data, "group_min"), vector(data, "group_max")) if has_range else (None, None)
    method = meta.get("method", "?")
    if "reorder" in steps:
        fig = new_figure(12, 7.5)
        ax_b, ax_a = fig.subplots(2, 1)
        _band(ax_b, bmin, bmax, BEFORE, "per-channel [min, max]", "before", 0.9)
        ax_b.set(title=f"before {method}", xlabel="channel (original order)")
        _band(ax_a, amin, amax, AFTER, "per-channel [min, max]", "after", 0.9)
        order = "cluster order" + (", " + " + ".join(s for s in steps if s != "reorder") + "d" if len(steps) > 1 else "")
        ax_a.set(title=f"after {method} ({transform})", xlabel=f"channel ({order})")
        axes = (ax_b, ax_a)
    else:
        fig = new_figure(12, 4.8)
        ax_a = fig.subplots()
        _band(ax_a, bmin, bmax, BEFORE, "before: per-channel [min, max]", "before", 0.55)
        _band(ax_a, amin, amax, AFTER, f"after {transform}: per-channel [min, max]", "after", 0.55)
        basis = "; after: rotated basis" if "rotation" in steps else ""
        ax_a.set(title=f"before vs after {method} ({transform})", xlabel=f"channel (original order{basis})")
        axes = (ax_a,)
    if sizes is not None:
        _clusters(ax_a, sizes, gmin, gmax)
    extra = (gmin, gmax) if has_range else ()
    if transform == "reorder":  # same values, other order: one y scale makes the panels comparable
        for ax in axes:
            _ylim(ax, bmin, bmax, amin, amax, *extra)
    else:
        _ylim(axes[0], bmin, bmax, *((amin, amax, *extra) if len(axes) == 1 else ()))
        _ylim(axes[-1], amin, amax, *extra, *((bmin, bmax) if len(axes) == 1 else ()))
    for ax in axes:  # outside the axes: outlier channels sit anywhere, the largest cluster at the right
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False)
    fig.suptitle(f"{meta.get('model', '?')}: layer {meta.get('layer', '?')}, point {meta.get('point', '?')}, "
                 f"{method}: per-channel activation range over the calibration tokens", fontsize=12)
    return finish(fig, path)


# ---------------------------------------------------------------- cluster map
def plot_cluster_map(entries: list[dict], path=None, title: str | None = None) -> Figure:
    """One row per (layer, point): a bar cut into the clusters (segment width = cluster size, in
    cluster order), each coloured by the width of its quantization range max - min.
    entries: dicts with layer, point, group_sizes and optionally group_min / group_max."""
    rows = [e for e in entries if e.get("group_sizes") is not None]
    if not rows:
        raise UserError("no reorder point with group_sizes to draw a cluster map of")
    widths = [np.asarray(e["group_max"], float) - np.asarray(e["group_min"], float)
              for e in rows if e.get("group_min") is not None and e.get("group_max") is not None]
    spans = np.concatenate(widths) if widths else np.ones(1)
    positive = spans[spans > 0]
    norm = (LogNorm(positive.min(), positive.max()) if len(positive) and positive.max() > positive.min()
            else Normalize(0.0, max(float(spans.max()), 1e-12)))
    cmap = colormaps["viridis"]
    height = 1.6 + 0.42 * len(rows)
    fig = new_figure(12, height)
    ax = fig.subplots()
    labels = []
    for y, entry in enumerate(rows):
        sizes = np.asarray(entry["group_sizes"], dtype=np.int64).reshape(-1)
        ends = np.cumsum(sizes)
        if entry.get("group_min") is not None and entry.get("group_max") is not None:
            span = np.asarray(entry["group_max"], float) - np.asarray(entry["group_min"], float)
            colors = cmap(norm(np.clip(span, positive.min() if len(positive) else 0, None)))
        else:
            colors = "lightgrey"
        ax.barh(y, sizes, left=ends - sizes, height=0.7, color=colors, edgecolor="white", lw=0.6,
                gid=f"row{y}")
        ax.text(ends[-1] * 1.005, y, f" {len(sizes)} clusters, sizes {sizes.min()}–{sizes.max()}",
                va="center", fontsize=8)
        labels.append(f"layer {entry['layer']} · {entry['point']}")
    ax.set_yticks(range(len(rows)), labels, fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no empty margin
    ax.set_xlim(0, max(int(np.sum(e["group_sizes"])) for e in rows) * 1.25)
    ax.set_xlabel("channel (cluster order); segment width = cluster size")
    bar = fig.colorbar(mappable=ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, shrink=min(1.0, 6.0 / height))
    bar.set_label("cluster quantization range max − min\n(activation units" +
                  (", log scale)" if isinstance(norm, LogNorm) else ")"))
    ax.set_title(title or "Cluster layout per layer and reorder point")
    return finish(fig, path)
