"""Per-channel activation ranges before and after a block's transforms, kept for ``--act_dist_plot``."""
from __future__ import annotations

import torch

from . import methods
from .context import BlockContext


def range_snapshot(observers: dict) -> dict:
    return {p: tuple(t.clone() for t in obs.channel_minmax()) for p, obs in observers.items() if obs.maxes}


def plot_ranges(before: dict, ctx: BlockContext, taps: dict) -> dict:
    """Per transformed point: ranges before (original order) and after (the new basis), the clusters
    and each cluster's quantization range, as eval.plots expects them. After a model step (QuaRot's
    residual_rotate) the norm-fed points are kept too, labelled with its name (already in R1's basis,
    before = after), for the figure that compares them with an unrotated run's."""
    out = {}
    kinds: dict[str, list[str]] = {}
    for placed in ctx.placements:
        kinds.setdefault(placed["point"], []).append("reorder" if placed["step"] == "reorder" else placed["transform"])
    model_steps = [s for s in ctx.cfg.transforms if methods.step(s).model is not None]
    if model_steps:  # the norm-fed points: the model step's R1 is their only rotation
        for edge in ctx.spec.norm_edges:
            kinds.setdefault(edge.point, [model_steps[0]])
    for point, steps in kinds.items():
        if point not in before or not ctx.observers[point].maxes:
            continue
        after = ctx.observers[point].channel_minmax()
        data = {"before_min": before[point][0], "before_max": before[point][1], "after_min": after[0],
                "after_max": after[1], "_transform": "+".join(dict.fromkeys(steps))}
        sizes = ctx.groups.get(point)
        tap = taps.get(point)
        if sizes is not None and getattr(tap, "ranges", None) is not None:
            starts = torch.tensor((0,) + sizes[:-1]).cumsum(0)
            data.update(group_sizes=torch.tensor(sizes), group_min=tap.ranges[0][starts].float(),
                        group_max=tap.ranges[1][starts].float())
        out[point] = data
    return out
