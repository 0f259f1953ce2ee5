"""Learned weight clipping for every method (``--w_clip learned``; LWC of OmniQuant and FlatQuant): per block,
after the method's transforms and before its weights are quantized, a factor on each weight row's maximum and
one on its minimum (sigmoid, starting at 0.982) are trained on the block-output MSE against the full-precision
block, with the run's own activation quantizers in the loop (straight-through) and AdamW on a cosine schedule
(rptq.block_learning). The weight quantizer (RTN or GPTQ) then takes the clipped ranges. FlatQuant learns the
same factors jointly with its transforms, so this fit does not run after it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import methods as registry
from ..act_quantizers import activation_quantizers
from ..block_learning import RowClips, Schedule, SteTap, ste_weight, train_block, training_weight_spec
from ..context import BlockContext
from ..method_api import Method, Needs, at_least_one, non_negative, positive, setting


def _alone(cfg) -> bool:
    return cfg.w_clip_fit == "learned" and not any(registry.step(s).fits_weight_clips for s in cfg.transforms)


LEARNED = Needs(custom=_alone, what="--w_clip learned (without a step that learns it, as flat_transform does)")


@dataclass(frozen=True)
class LWCSettings:
    namespace: ClassVar[str] = "lwc"
    epochs: int = setting(2, "lwc_epochs", "epochs of the learned weight clipping per block (default 2, sized for a "
                          "CPU; FlatQuant: 15)", type=int, check=non_negative, needs=LEARNED)
    lr: float = setting(5e-2, "lwc_lr", "its learning rate, cosine to 1e-3 of it (FlatQuant's clipping rate, 10 x "
                        "5e-3)", type=float, check=positive, needs=LEARNED)
    batch: int = setting(4, "lwc_batch", "calibration windows per step", type=int, check=at_least_one, needs=LEARNED)


def learn_weight_clips(ctx: BlockContext) -> None:
    """Train every linear's per-row clipping factors on the block output; leave them in ``ctx.weight_clips``."""
    settings, spec = ctx.cfg.of(LWCSettings), ctx.spec
    device = next(ctx.block.layer.parameters()).device
    taps = {p: SteTap(q) for p, q in activation_quantizers(ctx).items() if q.spec.enabled}
    base = {n: ctx.block.module(n).weight.detach().float() for n in spec.linear_inputs}
    wspecs = {n: training_weight_spec(ctx.cfg, w.shape[1], ctx.groups.get(spec.linear_inputs[n]))
              for n, w in base.items()}
    clips = {n: RowClips(w.shape[0]).to(device) for n, w in base.items()}

    def weights() -> dict:
        return {f"layer.{n}.weight": ste_weight(w, wspecs[n], *clips[n]()) for n, w in base.items()}

    report = train_block(ctx, taps, weights, [{"params": [p for c in clips.values() for p in c.parameters()],
                                               "lr": settings.lr}], Schedule(settings.epochs, settings.batch))
    with torch.no_grad():
        ctx.weight_clips.update({n: tuple(f.detach().cpu() for f in c()) for n, c in clips.items()})
    ctx.decisions["lwc"] = {**report, "mean_clip": {n: [float(f.mean()) for f in ctx.weight_clips[n]] for n in clips}}


METHOD = Method(
    name="lwc", summary="LWC (learned weight clipping, OmniQuant arXiv 2308.13137 / FlatQuant): per-row weight "
    "clipping trained on the block output, for any method (--w_clip learned)",
    settings=LWCSettings, clip_fits={"learned": learn_weight_clips},
    assumptions={"learned": ("LWC: per output row a factor on the maximum and one on the minimum of each weight "
                             "group's range (sigmoid, start 0.982), trained on the block-output MSE with the run's "
                             "activation quantizers (straight-through) and RTN weights in the loop, whatever "
                             "--w_quantizer quantizes them afterwards",)},
)
