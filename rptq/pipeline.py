"""RPTQ over a whole model: capture decoder inputs, then calibrate block after block."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .calibrate import BlockTiming, calibrate_block
from .config import QuantConfig


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for decoder layer 0 to record what the model feeds it."""

    def __init__(self, inputs: list, kwargs: list):
        super().__init__()
        self.inputs, self.kwargs = inputs, kwargs

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states.detach())
        if not self.kwargs:
            self.kwargs.append(kwargs)
        raise _StopForward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor,
                         device: torch.device) -> tuple[torch.Tensor, dict]:
    """Inputs of decoder layer 0 for each window (N, T, hidden), plus the keyword arguments the
    model passes its layers (position embeddings for RoPE models; masks are rebuilt by our blocks)."""
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []
    first = layers[0]
    layers[0] = _InputCatcher(inputs, kwargs)
    try:
        for window in windows:
            try:
                model(window.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
    keep = {k: v for k, v in kwargs[0].items()
            if k in ("position_embeddings", "position_ids") and v is not None}
    return torch.cat(inputs), keep


@dataclass
class CalibrationReport:
    layers: list[BlockTiming] = field(default_factory=list)
    capture_s: float = 0.0
    total_s: float = 0.0

    def summary(self) -> dict:
        sums = {k: sum(getattr(t, k) for t in self.layers) for k in ("stats_s", "kmeans_s", "weights_s", "output_s")}
        return {"capture_s": self.capture_s, "total_s": self.total_s, **sums,
                "passes_per_layer": max((t.passes for t in self.layers), default=0)}


def quantize_model(model: nn.Module, adapter, windows: torch.Tensor, cfg: QuantConfig,
                   device: torch.device | str = "cpu", progress: bool = True) -> CalibrationReport:
    """Replace every decoder layer of ``model`` by its reordered, quantized block, in place."""
    device = torch.device(device)
    start = time.perf_counter()
    spec = adapter.block_spec(model.config)
    layers = adapter.layers(model)
    report = CalibrationReport()
    inputs, layer_kwargs = capture_block_inputs(model, layers, windows, device)
    report.capture_s = time.perf_counter() - start
    for i in tqdm(range(len(layers)), desc="calibrating layers", disable=not progress):
        block = adapter.make_block(layers[i], spec).to(device)
        inputs, timing = calibrate_block(block, inputs, layer_kwargs, cfg)
        layers[i] = block
        report.layers.append(timing)
    report.total_s = time.perf_counter() - start
    return report


def wrap_blocks(model: nn.Module, adapter) -> None:
    """Install full-precision owned blocks (identity taps) in place of the layers."""
    spec = adapter.block_spec(model.config)
    layers = adapter.layers(model)
    for i in range(len(layers)):
        layers[i] = adapter.make_block(layers[i], spec)
