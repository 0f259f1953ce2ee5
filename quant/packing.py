"""Quantized weights as packed integer codes, for checkpoints that are actually small: which
container a stored weight is (:func:`load_packed`), and what the stored forms cost (sizes).

A fake-quantized weight is a float tensor that only takes grid values; storing the
grid index (b bits) plus the grid (scale, zero per row x input group) instead of the
float is what shrinks a checkpoint. The quantizer hands over its integer codes
(quant.quantizer.weight_codes, GPTQ.quantize_codes, GPTQT's bit planes); the containers
pack them and check that reload is bitwise exact:

* :class:`PackedAffine` (quant.packed_affine): uniform codes at b bits, scales in sf8/fp16/fp32,
  zero points packed in a window with exceptions;
* :class:`PackedBinary` (quant.packed_binary): k bit-planes at 1 bit per weight, alpha and offset
  per (row, group) in fp16 when exact, else fp32.
Dense bit packing and the sf8 scale format are quant.bitpack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bitpack import pack_codes, packed_row_bytes, snap_scales_sf8, unpack_codes
from .packed_affine import PackedAffine
from .packed_binary import PackedBinary

__all__ = ["PackedAffine", "PackedBinary", "SizeReport", "affine_nbytes", "load_packed", "pack_codes",
           "packed_nbytes", "packed_row_bytes", "size_report", "snap_scales_sf8", "unpack_codes"]

Packed = PackedAffine | PackedBinary


def load_packed(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> Packed:
    """Dispatch on ``meta['kind']``; ValueError for an unknown kind."""
    kinds = {"affine": PackedAffine, "binary": PackedBinary}
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in kinds:
        raise ValueError(f"packed weight {prefix}: unknown kind {kind!r}")
    return kinds[kind].from_tensors(prefix, tensors, meta)


# -- sizes ---------------------------------------------------------------------------------
def packed_nbytes(packed: Packed) -> int:
    """Bytes of every tensor the container stores (codes + scales + zeros, or planes + alpha + offset)."""
    return packed.nbytes


def affine_nbytes(rows: int, cols: int, groups: int, bits: int, scale_format: str = "fp16",
                  zero_bits: int | None = None) -> int:
    """What :class:`PackedAffine` stores for this layout, without building it (zero_bits default: bits)."""
    scale = {"sf8": groups + 1, "fp16": 2 * groups, "fp32": 4 * groups}[scale_format]
    zero = packed_row_bytes(groups, zero_bits if zero_bits is not None else bits)
    return rows * (packed_row_bytes(cols, bits) + scale + zero)


@dataclass(frozen=True)
class SizeReport:
    packed_bytes: int
    fp16_bytes: int

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.fp16_bytes if self.fp16_bytes else math.nan


def size_report(weights: dict[str, Packed]) -> SizeReport:
    """Packed bytes vs the fp16 bytes (2 x rows x cols) of the same weights."""
    return SizeReport(sum(p.nbytes for p in weights.values()),
                      sum(2 * p.shape[0] * p.shape[1] for p in weights.values()))
