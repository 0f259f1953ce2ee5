"""Asymmetric uniform fake quantization over contiguous channel groups.

Nothing here knows about models or methods. A *group layout* is a tuple of group
sizes along the last dimension (RPTQ's clusters after the permutation made them
contiguous); ``None`` means one group spanning the whole tensor (per-tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FULL_PRECISION = 16
_MIN_SCALE = 1e-8


def affine_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int):
    """Scale and integer zero point mapping [xmin, xmax] onto {0, ..., 2^bits - 1}."""
    levels = 2**bits - 1
    scale = ((xmax - xmin) / levels).clamp(min=_MIN_SCALE)
    zero = torch.round(-xmin / scale)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize; scale/zero broadcast against x."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def expand_groups(values: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
    """Repeat one value per group (last dim) into one value per channel."""
    sizes = torch.tensor(group_sizes, device=values.device)
    return torch.repeat_interleave(values, sizes, dim=-1)


def group_reduce(per_channel: torch.Tensor, group_sizes: tuple[int, ...], op: str) -> torch.Tensor:
    """Reduce the last dimension within each contiguous group with 'min' or 'max'."""
    parts = per_channel.split(list(group_sizes), dim=-1)
    if op == "min":
        return torch.stack([p.amin(dim=-1) for p in parts], dim=-1)
    return torch.stack([p.amax(dim=-1) for p in parts], dim=-1)


def group_params(cmin: torch.Tensor, cmax: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int):
    """Per-channel (scale, zero) from per-channel ranges, shared within each group.

    ``cmin``/``cmax`` have the channels on the last dim (any leading dims, e.g. weight rows).
    """
    if group_sizes is None:
        group_sizes = (cmin.shape[-1],)
    gmin = group_reduce(cmin, group_sizes, "min")
    gmax = group_reduce(cmax, group_sizes, "max")
    scale, zero = affine_params(gmin, gmax, bits)
    return expand_groups(scale, group_sizes), expand_groups(zero, group_sizes)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor point is quantized (also what the bit manifest reports)."""

    bits: int = FULL_PRECISION
    group_sizes: tuple[int, ...] | None = None  # None: one group (per tensor)
    dynamic: bool = False

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION

    @property
    def granularity(self) -> str:
        if self.group_sizes is None:
            return "tensor"
        return f"cluster({len(self.group_sizes)})"


class ActQuantizer(nn.Module):
    """Fake-quantizes activations on the last dim, static (calibrated) or dynamic per token."""

    def __init__(self, spec: QuantSpec, cmin: torch.Tensor | None = None, cmax: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        if spec.enabled and not spec.dynamic:
            if cmin is None or cmax is None:
                raise ValueError("a static activation quantizer needs calibrated per-channel ranges")
            if spec.group_sizes is None:  # per tensor: one scalar range
                cmin, cmax = cmin.min().reshape(1), cmax.max().reshape(1)
            self.scale, self.zero = group_params(cmin, cmax, spec.group_sizes, spec.bits)

    @classmethod
    def from_params(cls, spec: QuantSpec, scale: torch.Tensor | None, zero: torch.Tensor | None) -> "ActQuantizer":
        """Rebuild a calibrated quantizer from stored parameters (no ranges needed)."""
        quantizer = cls(QuantSpec(spec.bits, spec.group_sizes, dynamic=True))
        quantizer.spec, quantizer.scale, quantizer.zero = spec, scale, zero
        return quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if not spec.enabled:
            return x
        # Ranges are kept in fp32; the result goes back to the activation's dtype (fp16 on GPU).
        if not spec.dynamic:
            return fake_quant(x, self.scale, self.zero, spec.bits).to(x.dtype)
        xf = x.float()
        if spec.group_sizes is None:  # dynamic per token over all channels
            scale, zero = affine_params(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), spec.bits)
        else:  # per token, per cluster
            scale, zero = group_params(xf, xf, spec.group_sizes, spec.bits)
        return fake_quant(xf, scale, zero, spec.bits).to(x.dtype)


def weight_group_params(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int):
    """(rows, groups) scale/zero: one range per output row and input group (None: per row).

    Ranges always include 0 so that a zero weight stays exactly zero (GPTQ's convention).
    """
    sizes = group_sizes if group_sizes is not None else (weight.shape[-1],)
    # min(min(w), 0) == min(min(w, 0)): clamping the reduced values avoids two weight-sized copies.
    wmin = group_reduce(weight, sizes, "min").clamp(max=0)
    wmax = group_reduce(weight, sizes, "max").clamp(min=0)
    return affine_params(wmin, wmax, bits)


def weight_params(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int):
    """Per (output row x input group) scale/zero, expanded to the weight's shape."""
    scale, zero = weight_group_params(weight, group_sizes, bits)
    sizes = group_sizes if group_sizes is not None else (weight.shape[-1],)
    return expand_groups(scale, sizes), expand_groups(zero, sizes)


def quantize_weight_rtn(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int) -> torch.Tensor:
    scale, zero = weight_params(weight, group_sizes, bits)
    return fake_quant(weight, scale, zero, bits)
