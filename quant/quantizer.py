"""The quantizers: activations (static calibrated ranges or dynamic, :class:`ActQuantizer`) and
round-to-nearest weights, over contiguous channel groups; each gives its integer codes with the
scale and zero point that dequantize them (the grid itself is quant.grid).

Nothing here knows about models or methods. A *group layout* is a tuple of group
sizes along the last dimension (RPTQ's clusters after the permutation made them
contiguous, or heads); ``None`` means one group spanning the whole last dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .bitpack import snap_scales_sf8
from .clip_search import clip_search
from .grid import affine_params, code_dtype, code_range, dequantize, fake_quant, quantize, zero_point

FULL_PRECISION = 16
UNIT_LEVELS = 255  # RPTQ's softmax quantizer 'fix0to1': round(x * 255) / 255 whatever the bit width


def unit_grid(x: torch.Tensor) -> torch.Tensor:
    """RPTQ's fixed grid for softmax probabilities (fix0to1): round(x * 255) / 255, in one buffer."""
    return torch.mul(x, UNIT_LEVELS).round_().div_(UNIT_LEVELS)


def expand_groups(values: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
    """Repeat one value per group (last dim) into one value per channel."""
    sizes = torch.tensor(group_sizes, device=values.device)
    return torch.repeat_interleave(values, sizes, dim=-1)


def group_reduce(per_channel: torch.Tensor, group_sizes: tuple[int, ...], op: str) -> torch.Tensor:
    """Reduce the last dimension within each contiguous group with 'min' or 'max'."""
    if len(group_sizes) == 1:
        return per_channel.amin(-1, keepdim=True) if op == "min" else per_channel.amax(-1, keepdim=True)
    if len(set(group_sizes)) == 1:  # equal groups (heads, fixed group size): one reshape
        grouped = per_channel.unflatten(-1, (len(group_sizes), group_sizes[0]))
        return grouped.amin(-1) if op == "min" else grouped.amax(-1)
    parts = per_channel.split(list(group_sizes), dim=-1)
    if op == "min":
        return torch.stack([p.amin(dim=-1) for p in parts], dim=-1)
    return torch.stack([p.amax(dim=-1) for p in parts], dim=-1)


def group_params(cmin: torch.Tensor, cmax: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int,
                 grid: str = "full", clip: float = 1.0, clip_low: float | None = None):
    """Per-channel (scale, zero) from per-channel ranges, shared within each group.

    ``cmin``/``cmax`` have the channels on the last dim (any leading dims, e.g. tokens or rows).
    ``clip`` scales both ends of every range towards 0 (DuQuant's clipping ratios); ``clip_low``, where given,
    scales the minimum instead (FlatQuant's LAC learns one factor per end).
    """
    if group_sizes is None:
        group_sizes = (cmin.shape[-1],)
    gmin = group_reduce(cmin, group_sizes, "min") * (clip if clip_low is None else clip_low)
    gmax = group_reduce(cmax, group_sizes, "max") * clip
    scale, zero = affine_params(gmin, gmax, bits, grid)
    return expand_groups(scale, group_sizes), expand_groups(zero, group_sizes)


DYNAMIC = (None, "token", "sequence")


@dataclass(frozen=True)
class QuantSpec:
    """How one activation point is quantized (also what the bit manifest reports).

    dynamic: None = static calibrated ranges; "token" = one range per token (and group);
    "sequence" = one range per sequence (batch element) and group (RPTQ's --a_dynamic).
    unit_grid: the fixed [0, 1] grid of RPTQ's softmax quantizer (bits only say it is on).
    zero_in_range: a dynamic range always reaches 0 (min(x, 0) .. max(x, 0), before clipping), as QuaRot's and
    SpinQuant's per-token quantizer of K and FlatQuant's of every activation do; plain min .. max otherwise.
    clip_low: the clipping factor of the range's minimum where it differs from ``clip`` (on the maximum):
    FlatQuant's learned activation clipping has one per end.
    """

    bits: int = FULL_PRECISION
    group_sizes: tuple[int, ...] | None = None  # None: one group (per tensor, or per token if dynamic)
    dynamic: str | None = None
    grid: str = "full"
    clip: float = 1.0
    unit_grid: bool = False
    zero_in_range: bool = False
    clip_low: float | None = None

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION

    @property
    def static(self) -> bool:
        """Quantized on calibrated ranges: the one kind that needs ranges and stores a scale and zero point."""
        return self.enabled and self.dynamic is None and not self.unit_grid

    @property
    def granularity(self) -> str:
        if self.unit_grid:
            return "fixed [0,1] grid"
        where = "tensor" if self.group_sizes is None else f"{len(self.group_sizes)} groups"
        return where if self.dynamic is None else f"{where} per {self.dynamic}"


class ActQuantizer(nn.Module):
    """Fake-quantizes activations on the last dim: static (calibrated ranges) or dynamic."""

    def __init__(self, spec: QuantSpec, cmin: torch.Tensor | None = None, cmax: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        if spec.static:
            if cmin is None or cmax is None:
                raise ValueError("a static activation quantizer needs calibrated per-channel ranges")
            if spec.group_sizes is None:  # per tensor: one scalar range
                cmin, cmax = cmin.min().reshape(1), cmax.max().reshape(1)
            self.scale, self.zero = group_params(cmin.float(), cmax.float(), spec.group_sizes, spec.bits, spec.grid,
                                                 spec.clip, spec.clip_low)

    @classmethod
    def from_params(cls, spec: QuantSpec, scale: torch.Tensor | None, zero: torch.Tensor | None) -> "ActQuantizer":
        """Rebuild a calibrated quantizer from stored parameters (no ranges needed)."""
        quantizer = cls(QuantSpec(spec.bits, spec.group_sizes, dynamic="token"))
        quantizer.spec, quantizer.scale, quantizer.zero = spec, scale, zero
        return quantizer

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the input the grid reads, scale, zero): the calibrated grid, or this input's own ranges."""
        spec = self.spec
        if spec.dynamic is None:
            return x, self.scale, self.zero
        xf = x.float()
        if spec.dynamic == "token":
            lo, hi = (xf.clamp(max=0), xf.clamp(min=0)) if spec.zero_in_range else (xf, xf)
        else:  # per sequence: reduce every dim between the batch and the channels
            flat = xf.reshape(xf.shape[0], -1, xf.shape[-1])
            lo = flat.amin(1).reshape(xf.shape[0], *[1] * (xf.dim() - 2), xf.shape[-1])
            hi = flat.amax(1).reshape(lo.shape)
        return xf, *group_params(lo, hi, spec.group_sizes, spec.bits, spec.grid, spec.clip, spec.clip_low)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integer codes, scale, zero) of x; ``dequantize`` of them is ``forward(x)`` bit for bit.
        Uniform grids only: the unit grid divides by 255, it has no scale to multiply."""
        if not self.spec.enabled or self.spec.unit_grid:
            raise ValueError(f"no integer codes for a {self.spec.granularity if self.spec.enabled else 'disabled'} "
                             "quantizer")
        xq, scale, zero = self._params(x)
        codes = quantize(xq, scale, zero, self.spec.bits, self.spec.grid)
        return codes.to(code_dtype(self.spec.bits, self.spec.grid)), scale, zero

    @staticmethod
    def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(codes, scale, zero).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if not spec.enabled:
            return x
        if spec.unit_grid:
            return unit_grid(x.float()).to(x.dtype)
        # Ranges are kept in fp32; the result goes back to the activation's dtype (fp16 on GPU).
        # fake_quant rather than dequantize(quantize(x)): one activation-sized buffer, the same numbers.
        xq, scale, zero = self._params(x)
        return fake_quant(xq, scale, zero, spec.bits, spec.grid).to(x.dtype)


@dataclass(frozen=True)
class WeightSpec:
    """How one weight is quantized: one range per output row and input-channel group.

    include_zero: force 0 into every range (GPTQ's convention: a zero weight stays exactly 0);
    RPTQ's reference uses plain min/max. fp16_scales: round every scale to an fp16 number, so
    that codes plus fp16 scales (a packed checkpoint) reproduce the weight bit for bit.
    sf8_scales: round every scale up onto the 1-byte sf8 grid (quant.bitpack; 5 significant
    bits, <= 6.25% larger) -- smaller checkpoints, different numbers.
    """

    bits: int = 4
    group_sizes: tuple[int, ...] | None = None  # None: per output row
    grid: str = "full"
    include_zero: bool = True
    clip: float = 1.0
    fp16_scales: bool = False
    sf8_scales: bool = False
    clip_search: bool = False  # QuaRot's per-(row, group) range search (quant.clip_search), after ``clip``
    row_clip: tuple | None = None  # learned (max, min) factors per output row (LWC), after ``clip``


def weight_group_params(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int,
                        spec: WeightSpec | None = None):
    """(rows, groups) scale/zero: one range per output row and input group (None: per row)."""
    spec = spec or WeightSpec(bits=bits)
    sizes = group_sizes if group_sizes is not None else (weight.shape[-1],)
    wmin = group_reduce(weight, sizes, "min")
    wmax = group_reduce(weight, sizes, "max")
    if spec.include_zero:  # min(min(w), 0) == min(min(w, 0)): no weight-sized copies
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    if spec.clip != 1.0:
        wmin, wmax = wmin * spec.clip, wmax * spec.clip
    if spec.row_clip is not None:
        up, low = (f.to(wmax.device, wmax.dtype).reshape(-1, 1) for f in spec.row_clip)
        wmin, wmax = wmin * low, wmax * up
    if spec.clip_search:
        wmin, wmax = clip_search(weight, sizes, wmin, wmax, bits, spec.grid)
    scale, zero = affine_params(wmin, wmax, bits, spec.grid)
    if spec.fp16_scales or spec.sf8_scales:
        snap = snap_scales_sf8 if spec.sf8_scales else fp16_representable
        symmetric = spec.grid in ("symmetric", "quarot")  # zero point 0: no constant group to place
        flat = (wmax == wmin) & (wmax != 0) if not symmetric else torch.zeros_like(wmax, dtype=torch.bool)
        if bool(flat.any()):
            scale, flat_zero = _flat_group_grid(wmax, flat, scale, bits, spec.grid, snap)
        else:
            scale = snap(scale)
        zero = zero_point(wmin, wmax, scale, spec.grid)  # the zero point follows the stored scale
        if bool(flat.any()):
            zero = torch.where(flat, flat_zero, zero)
    return scale, zero


def _flat_group_grid(value: torch.Tensor, flat: torch.Tensor, scale: torch.Tensor, bits: int, grid: str, snap):
    """Scales and zero points for constant groups (a one-channel cluster: min == max) when
    scales are snapped to a storable format.

    Such a group has no range: unsnapped it gets scale 1e-8 and a zero point ~ -value * 1e8,
    which a packed checkpoint can only store as an fp32 exception per row. Instead its value
    becomes k steps of a snapped scale from a zero point at the grid's end (k = 1 .. 2^b - 1,
    the k whose fake-quantized value is nearest), so its zero point lies on the code grid --
    and its value is as precise as the format's scales. Returns (snapped scales, flat zeros).
    """
    qmin, _ = code_range(bits, grid)
    best_err = torch.full_like(value, torch.inf)
    best_k = torch.ones_like(value)
    for k in range(1, 2**bits):
        s = snap(torch.where(flat, value.abs() / k, scale))
        z = torch.where(value > 0, torch.full_like(value, qmin), qmin + k + torch.zeros_like(value))
        w_hat = fake_quant(value, s, z, bits, grid)
        err = (w_hat - value).abs()
        better = err < best_err
        best_err, best_k = torch.where(better, err, best_err), torch.where(better, float(k), best_k)
    zero = torch.where(value > 0, torch.full_like(value, qmin), qmin + best_k)
    return snap(torch.where(flat, value.abs() / best_k, scale)), zero


def fp16_representable(scale: torch.Tensor) -> torch.Tensor:
    """The nearest fp16 number (kept in fp32), within fp16's normal range."""
    tiny, big = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    return scale.clamp(tiny, big).half().float()


def weight_params(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int,
                  spec: WeightSpec | None = None):
    """Per (output row x input group) scale/zero, expanded to the weight's shape."""
    scale, zero = weight_group_params(weight, group_sizes, bits, spec)
    sizes = group_sizes if group_sizes is not None else (weight.shape[-1],)
    return expand_groups(scale, sizes), expand_groups(zero, sizes)


def quantize_weight_rtn(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int,
                        spec: WeightSpec | None = None) -> torch.Tensor:
    """The fake-quantized weight: ``dequantize_weight(*weight_codes(...))`` bit for bit, in one buffer."""
    grid = spec.grid if spec is not None else "full"
    scale, zero = weight_params(weight, group_sizes, bits, spec)
    return fake_quant(weight, scale, zero, bits, grid)


def weight_codes(weight: torch.Tensor, group_sizes: tuple[int, ...] | None, bits: int,
                 spec: WeightSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, as integers: (codes (rows, cols) in code_range(bits, grid), scale and zero
    (rows, groups)) -- what a packed checkpoint stores."""
    grid = spec.grid if spec is not None else "full"
    scale, zero = weight_group_params(weight, group_sizes, bits, spec)
    sizes = group_sizes if group_sizes is not None else (weight.shape[-1],)
    codes = quantize(weight, expand_groups(scale, sizes), expand_groups(zero, sizes), bits, grid)
    return codes.to(code_dtype(bits, grid)), scale, zero


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      group_sizes: tuple[int, ...] | None) -> torch.Tensor:
    """(codes - zero) * scale with (rows, groups) scale/zero: the fake-quantized weight, bit for bit."""
    sizes = group_sizes if group_sizes is not None else (codes.shape[-1],)
    return dequantize(codes, expand_groups(scale, sizes), expand_groups(zero, sizes))


def fixed_groups(columns: int, group_size: int) -> tuple[int, ...]:
    """Contiguous groups of ``group_size`` columns (the last one shorter if it does not divide)."""
    full, rest = divmod(columns, group_size)
    return (group_size,) * full + ((rest,) if rest else ())
