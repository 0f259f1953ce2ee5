"""The uniform integer grid: its code range, the scale and zero point of a range, quantize to
codes, dequantize. The one definition every quantizer uses -- activations and RTN weights
(quant.quantizer), GPTQ's column sweep (quant.gptq), GPTQT's n-bit step (quant.gptqt) and the
packed checkpoint (quant.packing) -- so a code means the same number everywhere.

Three grids, named by where they come from:
- ``full``: asymmetric, 2^b - 1 steps covering [min, max], codes 0 .. 2^b - 1 (GPTQ, DuQuant, FPTQ weights);
- ``reference``: RPTQ's UniformAffineQuantizer: scale (max - min) / 2^b, zero point
  round(-(max + min) / (2 scale)) on the signed codes -2^(b-1) .. 2^(b-1) - 1, so the grid's 2^b levels
  span [min, max - scale] and the top step is clipped;
- ``reference_clamped``: the same with the reference code's clamps, scale in [1e-4, 1e4] and zero point in
  +-1e4 (parity with its figures; see below why it is not the default);
- ``symmetric``: scale max|x| / (2^(b-1) - 1), zero point 0 (SmoothQuant, FPTQ activations);
- ``quarot``: the same scale and zero point on the two's-complement codes -2^(b-1) .. 2^(b-1) - 1
  (QuaRot's sym_quant: a clipped range's negative side rounds onto the extra code -2^(b-1)).
Every grid quantizes as clamp(round(x / scale) + zero) and dequantizes as (code - zero) * scale, in
fp32: codes plus the same scale and zero give the fake-quantized value bit for bit.
"""
from __future__ import annotations

import torch

GRIDS = ("full", "reference", "reference_clamped", "symmetric", "quarot")
_REFERENCE = ("reference", "reference_clamped")
# A floor, not a working value: it only keeps a constant group from dividing by zero, and lets it round-trip.
_MIN_SCALE = 1e-8
# The RPTQ reference code clamps scales to [1e-4, 1e4] and zero points to +-1e4 ("reference_clamped"). A constant
# group then lands on a 1e-4 step, and one beyond 1 in magnitude, whose zero point the clamp cuts, near +-1: every
# single-channel weight cluster with |w| > 1 is clipped to ~1. On SmolLM2-135M (W4A4, RPTQ's defaults) that takes
# PTB perplexity from 133 to 410369, so the default "reference" grid keeps the reference's formulas without it.
_REFERENCE_SCALE = (1e-4, 1e4)
_REFERENCE_ZERO = 1e4


def _unknown(grid: str) -> ValueError:
    return ValueError(f"unknown grid {grid!r}; one of {', '.join(GRIDS)}")


def code_range(bits: int, grid: str = "full") -> tuple[int, int]:
    """(qmin, qmax) of the integer codes of a grid."""
    if grid == "full":
        return 0, 2**bits - 1
    if grid in (*_REFERENCE, "quarot"):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if grid == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    raise _unknown(grid)


def code_dtype(bits: int, grid: str = "full") -> torch.dtype:
    """The narrowest integer dtype holding every code of the grid (kept codes cost 1 byte up to 8 bits)."""
    qmin, qmax = code_range(bits, grid)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64


def zero_point(xmin: torch.Tensor, xmax: torch.Tensor, scale: torch.Tensor, grid: str = "full") -> torch.Tensor:
    """The integer zero point of the range [xmin, xmax] at a given scale (which may have been
    snapped to a storable format after :func:`affine_params` chose it)."""
    if grid == "full":
        return torch.round(-xmin / scale)
    if grid == "reference":
        return torch.round(-(xmax + xmin) / (2 * scale))
    if grid == "reference_clamped":
        return torch.round((-(xmax + xmin) / (2 * scale)).clamp(-_REFERENCE_ZERO, _REFERENCE_ZERO))
    if grid in ("symmetric", "quarot"):
        return torch.zeros_like(scale)
    raise _unknown(grid)


def affine_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, grid: str = "full"):
    """Scale and integer zero point of a grid for the range [xmin, xmax] (elementwise)."""
    if grid == "full":
        scale = (xmax - xmin) / (2**bits - 1)
    elif grid in _REFERENCE:
        scale = (xmax - xmin) / 2**bits
    elif grid in ("symmetric", "quarot"):
        scale = torch.maximum(xmin.abs(), xmax.abs()) / (2 ** (bits - 1) - 1)
    else:
        raise _unknown(grid)
    scale = scale.clamp(*_REFERENCE_SCALE) if grid == "reference_clamped" else scale.clamp(min=_MIN_SCALE)
    return scale, zero_point(xmin, xmax, scale, grid)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, grid: str = "full") -> torch.Tensor:
    """Codes clamp(round(x / scale) + zero, qmin, qmax) as floats (exact integers) in a new buffer;
    scale/zero broadcast against x. ``.to(code_dtype(bits, grid))`` makes them integers."""
    qmin, qmax = code_range(bits, grid)
    q = torch.div(x, scale).round_()
    q = q.add_(zero) if _broadcasts_into(zero.shape, q.shape) else q + zero
    return q.clamp_(qmin, qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(codes - zero) * scale: integer codes promote to the zero point's float type exactly.
    The product reuses the difference's buffer where it can (GPTQ calls this once per column)."""
    out = codes - zero
    if out.dtype == scale.dtype and _broadcasts_into(scale.shape, out.shape):
        return out.mul_(scale)
    return out * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               grid: str = "full") -> torch.Tensor:
    """dequantize(quantize(x)), with the same operations in the same order on one buffer: an
    activation-sized tensor (12 x 512 x 512 attention probabilities) is allocated once, not five times."""
    return quantize(x, scale, zero, bits, grid).sub_(zero).mul_(scale)


def _broadcasts_into(inner: torch.Size, outer: torch.Size) -> bool:
    """Whether a tensor of shape ``inner`` broadcasts against ``outer`` without growing it
    (torch.broadcast_shapes costs ~70 us here: GPTQ calls the grid once per column)."""
    if inner == outer:
        return True
    return len(inner) <= len(outer) and all(i in (1, o) for i, o in zip(reversed(inner), reversed(outer)))
