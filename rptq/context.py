"""What a method sees: of one block while it plans its transforms (BlockContext), of the whole model
before layer 0 (ModelContext, for model steps such as QuaRot's R1)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.block import QuantBlock
from models.spec import BlockSpec

from .config import QuantConfig
from .fold import place, place_qk
from .stats import ChannelObserver
from quant.transforms import ChannelTransform


@dataclass
class BlockContext:
    block: QuantBlock
    observers: dict[str, ChannelObserver]
    cfg: QuantConfig
    layer: int = 0
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)  # point -> contiguous channel groups
    decisions: dict[str, dict] = field(default_factory=dict)  # point -> what a method decided (reported)
    placements: list[dict] = field(default_factory=list)  # every transform placed, in order
    given: dict = field(default_factory=dict)  # what model steps handed this layer (ModelContext.per_layer)
    # The block's calibration inputs, its full-precision outputs on them (the FP pass) and the layer's keyword
    # arguments (rotary tables): what a learned step trains on. The block's weights are in ``block``.
    inputs: torch.Tensor | None = None
    fp_outputs: torch.Tensor | None = None
    layer_kwargs: dict = field(default_factory=dict)
    weight_clips: dict = field(default_factory=dict)  # linear -> learned per-row (max, min) clip factors
    # Channel ranges from a pass without the policy's fixed quantizers, in the block's original channel order
    # (Step.unquantized_features); None when the statistics pass already is that pass.
    feature_observers: dict[str, ChannelObserver] | None = None

    @property
    def spec(self) -> BlockSpec:
        return self.block.spec

    def generator(self, salt: int = 0) -> torch.Generator:
        """Seeded by the run's seed and the layer: same seed, same transforms."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.layer * 7919 + salt)

    def apply(self, point: str, t: ChannelTransform, producer_form: ChannelTransform | None = None,
              step: str = "") -> str:
        where = place(self.block, point, t, self.observers, producer_form)
        self.placements.append({"point": point, "transform": t.kind, "where": where, "step": step})
        return where

    def apply_qk(self, tq: ChannelTransform, tk: ChannelTransform, step: str = "") -> str:
        where = place_qk(self.block, tq, tk, self.observers)
        qk = self.spec.qk_edge
        for point, t in ((qk.q_point, tq), (qk.k_point, tk)):
            self.placements.append({"point": point, "transform": t.kind, "where": where, "step": step})
        return where


@dataclass
class ModelContext:
    """What a model step (rptq.method_api.Step.model) sees before layer 0: the model in memory, its adapter,
    the calibration windows; ``given``: what the caller supplies (e.g. rotations learned already);
    ``report``: entries of results.json's ``calibration``; ``per_layer``: name -> one value per layer, handed
    to each block as ``BlockContext.given[name]``."""

    model: torch.nn.Module
    adapter: object
    windows: torch.Tensor
    cfg: QuantConfig
    device: torch.device
    given: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    per_layer: dict = field(default_factory=dict)
