"""Running decoder blocks outside the model's own forward: capture what the model feeds
layer 0, run a block over a stack of windows, move captured layer arguments to a device.

Calibration (rptq.pipeline) and layer-by-layer perplexity (eval.ppl) both run blocks this way.
"""
from __future__ import annotations

import torch
from torch import nn

from quant.threads import single_thread_on_cpu


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, layer_kwargs: dict, batch_size: int = 1) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        out = block(inputs[start:start + batch_size], **layer_kwargs)
        with single_thread_on_cpu(outputs.device):  # a copy: same bits on one thread, no hand-offs
            outputs[start:start + batch_size] = out
    return outputs


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


def layer_kwargs_on(layer_kwargs: dict, device: torch.device) -> dict:
    """Move captured layer arguments (e.g. rotary tables) to a layer's device."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in layer_kwargs.items()}


def wrap_blocks(model: nn.Module, adapter) -> None:
    """Install full-precision owned blocks (identity taps) in place of the layers."""
    spec = adapter.block_spec(model.config)
    layers = adapter.layers(model)
    for i in range(len(layers)):
        layers[i] = adapter.make_block(layers[i], spec)
