"""Binary-coded weights packed as bit planes (:class:`PackedBinary`, GPTQT and BCQ): k sign bits per
weight plus alpha and offset per (row, group), stored so that reload rebuilds the weight bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bitpack import bitwise_equal, compact_float, pack_codes, packed_row_bytes, unpack_codes
from .packed_layout import VERSION, check_layout, check_meta, require
from .quantizer import expand_groups

@dataclass
class PackedBinary:
    """Binary-coded weights (GPTQT): w = offset + sum_i alpha_i * b_i with b_i in {-1, +1}.

    Stored bit 1 means b = +1, bit 0 means b = -1. ``dequantize`` evaluates, in fp32,
    ``out = offset; for i in 0..k-1: out = out + alpha[..., i] * b_i`` (alpha/offset
    expanded per column), then casts: the quantizer must produce w with this same order.
    """

    planes: torch.Tensor  # uint8 (k, rows, ceil(cols/8)), one bit per weight and plane
    alpha: torch.Tensor  # fp16/fp32 (rows, groups, k)
    offset: torch.Tensor  # fp16/fp32 (rows, groups)
    group_sizes: tuple[int, ...]
    shape: tuple[int, int]

    @classmethod
    def from_planes(cls, planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor,
                    group_sizes: tuple[int, ...] | None = None,
                    weight_hat: torch.Tensor | None = None) -> "PackedBinary":
        """``planes``: (k, rows, cols), bool or +-1; raises if ``weight_hat`` is not reproduced bitwise."""
        if planes.dim() != 3:
            raise ValueError(f"bit planes must be (k, rows, cols), got shape {tuple(planes.shape)}")
        planes, alpha, offset = planes.detach().cpu(), alpha.detach().cpu(), offset.detach().cpu()
        k, rows, cols = planes.shape
        shape, sizes = check_layout((rows, cols), group_sizes)
        if planes.dtype != torch.bool:
            if not bool(((planes == 1) | (planes == -1)).all()):
                raise ValueError("bit planes must hold only -1 and +1")
            planes = planes > 0
        if tuple(alpha.shape) != (rows, len(sizes), k) or tuple(offset.shape) != (rows, len(sizes)):
            raise ValueError(f"alpha {tuple(alpha.shape)} / offset {tuple(offset.shape)} do not match "
                             f"({rows}, {len(sizes)}, {k}) / ({rows}, {len(sizes)})")
        packed = pack_codes(planes.reshape(k * rows, cols).to(torch.int64), 1).reshape(k, rows, -1)
        out = cls(packed, compact_float(alpha), compact_float(offset), sizes, shape)
        if weight_hat is not None and not bitwise_equal(out.dequantize(weight_hat.dtype), weight_hat.detach().cpu()):
            raise ValueError("weight does not dequantize bitwise from its bit planes, alpha and offset")
        return out

    @property
    def k(self) -> int:
        return self.planes.shape[0]

    def signs(self) -> torch.Tensor:
        """(k, rows, cols) fp32 in {-1, +1}."""
        k, (rows, cols) = self.k, self.shape
        bits = unpack_codes(self.planes.reshape(k * rows, -1), 1, cols).reshape(k, rows, cols)
        return bits.float() * 2 - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        signs = self.signs()
        out = expand_groups(self.offset.float(), self.group_sizes)
        for i in range(self.k):  # fixed order: the documented formula
            out = out + expand_groups(self.alpha[..., i].float(), self.group_sizes) * signs[i]
        return out.to(dtype)

    def meta(self) -> dict:
        return {"kind": "binary", "version": VERSION, "k": self.k, "shape": list(self.shape),
                "group_sizes": list(self.group_sizes),
                "alpha_dtype": "fp16" if self.alpha.dtype == torch.float16 else "fp32",
                "offset_dtype": "fp16" if self.offset.dtype == torch.float16 else "fp32"}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.planes": self.planes, f"{prefix}.alpha": self.alpha, f"{prefix}.offset": self.offset}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> "PackedBinary":
        check_meta(meta, "binary")
        floats = {"fp16": torch.float16, "fp32": torch.float32}
        try:
            k = int(meta["k"])
            shape, sizes = check_layout(tuple(meta["shape"]), meta["group_sizes"])
            adt, odt = floats[meta["alpha_dtype"]], floats[meta["offset_dtype"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"packed weight {prefix}: bad or missing meta field {err}") from None
        if k < 1:
            raise ValueError(f"packed weight {prefix}: k must be >= 1, got {k}")
        rows, groups = shape[0], len(sizes)
        planes = require(tensors, f"{prefix}.planes", torch.uint8, (k, rows, packed_row_bytes(shape[1], 1)))
        alpha = require(tensors, f"{prefix}.alpha", adt, (rows, groups, k))
        offset = require(tensors, f"{prefix}.offset", odt, (rows, groups))
        return cls(planes, alpha, offset, sizes, shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors("").values())
