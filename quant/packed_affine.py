"""Uniform affine weights packed as integer codes (:class:`PackedAffine`): the codes a quantizer
produced, b bits each, plus its grid (scale and zero point per row x input group), stored so that
reload dequantizes, with quant.grid's own formula, to the saved weight bit for bit.

* codes: ``b`` bits per weight, packed densely along each row (quant.bitpack);
* zero points: per tensor, ``zero - zero_base`` packed at ``zero_bits`` bits, the window
  [zero_base, zero_base + 2^zero_bits) chosen to minimise bytes; the few zeros outside it
  (a constant group -- a one-channel cluster -- gets scale 1e-8 and a zero point ~1e8 on
  a grid that excludes 0) are stored exactly beside it as (index, value) exceptions;
* scales: ``sf8`` (1 byte, plus one int8 exponent base per row) when every scale lies on
  that grid, else fp16 when exactly representable, else fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bitpack import (MAX_CODE_BITS, bitwise_equal, check_bits, compact_float, pack_codes, packed_row_bytes,
                      sf8_decode, sf8_encode, unpack_codes)
from .grid import dequantize
from .packed_layout import VERSION, check_layout, check_meta, require
from .quantizer import expand_groups

_EXCEPTION_BYTES = 8  # an int32 flat index + the fp32 zero point


def _zero_window(z: torch.Tensor, rows: int, groups: int) -> tuple[int, int]:
    """(zero_bits, zero_base) minimising the packed zeros plus the exceptions outside the window.

    The full spread (no exceptions) is one candidate, so this is never worse than packing
    every zero point at the width of the widest.
    """
    zs = z.flatten().to(torch.int64).sort().values
    if zs.numel() == 0:
        return 1, 0
    spread_bits = max(1, int(zs[-1] - zs[0]).bit_length())
    best = (rows * packed_row_bytes(groups, spread_bits), spread_bits, int(zs[0]))
    bases = zs.unique_consecutive()
    for bits in range(1, spread_bits):
        inside = torch.searchsorted(zs, bases + 2**bits) - torch.searchsorted(zs, bases)
        i = int(inside.argmax())  # the first (lowest) base among the best windows
        cost = rows * packed_row_bytes(groups, bits) + (zs.numel() - int(inside[i])) * _EXCEPTION_BYTES
        if cost < best[0]:
            best = (cost, bits, int(bases[i]))
    return best[1], best[2]


def _per_group(values: torch.Tensor, rows: int, sizes: tuple[int, ...], what: str) -> torch.Tensor:
    """(rows, groups) from (rows, groups) or per-column (rows, cols) values constant per group."""
    v = values.detach().float().cpu()
    if v.shape == (rows, len(sizes)):
        return v
    if v.shape == (rows, sum(sizes)):
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        g = v[:, starts]
        if bitwise_equal(expand_groups(g, sizes), v):
            return g
        raise ValueError(f"per-column {what} is not constant within each group")
    raise ValueError(f"{what} has shape {tuple(v.shape)}, expected ({rows}, {len(sizes)}) or ({rows}, {sum(sizes)})")


@dataclass
class PackedAffine:
    """Uniform affine codes: w = (q - zero) * scale with q = qmin + stored code.

    ``qmin`` is 0 (the {0..2^b-1} grid of fake_quant) or -2^(b-1) (a signed grid).
    """

    codes: torch.Tensor  # uint8 (rows, ceil(cols*bits/8))
    scale: torch.Tensor  # sf8: uint8 (rows, groups); else fp16/fp32 (rows, groups)
    scale_base: torch.Tensor | None  # sf8 only: int8 (rows,) exponent base
    zero: torch.Tensor  # uint8 (rows, ceil(groups*zero_bits/8)): zero - zero_base, packed
    zero_bits: int
    zero_base: int
    group_sizes: tuple[int, ...]
    bits: int
    shape: tuple[int, int]
    qmin: int = 0
    zero_fix_index: torch.Tensor | None = None  # int32 (n,): flat row * groups + group of each exception
    zero_fix_value: torch.Tensor | None = None  # fp32 (n,): its zero point (an fp32 integer: exact)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_sizes: tuple[int, ...] | None = None, qmin: int = 0,
                   weight_hat: torch.Tensor | None = None) -> "PackedAffine":
        """Pack the integer codes a quantizer produced (rows, cols), in [qmin, qmin + 2^bits).

        ``scale``/``zero``: (rows, groups), or per column (rows, cols) constant within each group.
        ``weight_hat``, when given, must be what the stored form dequantizes to in its dtype, bit
        for bit (the fake-quantized weight the codes came with); ValueError otherwise.
        """
        check_bits(bits)
        if qmin not in (0, -(2 ** (bits - 1))):
            raise ValueError(f"qmin must be 0 or {-(2 ** (bits - 1))} for {bits} bits, got {qmin}")
        shape, sizes = check_layout(tuple(codes.shape), group_sizes)
        q = codes.detach().cpu()
        if q.dtype == torch.bool or (q.dtype.is_floating_point and not torch.equal(q, q.round())):
            raise ValueError(f"codes must be integers, got {q.dtype}")
        q = q.to(torch.int64)
        if q.numel() and (int(q.min()) < qmin or int(q.max()) >= qmin + 2**bits):
            raise ValueError(f"codes outside [{qmin}, {qmin + 2**bits}): not {bits}-bit codes of this grid")
        s, z = _per_group(scale, shape[0], sizes, "scale"), _per_group(zero, shape[0], sizes, "zero")
        if not torch.equal(z, z.round()) or not bool(z.isfinite().all()):
            raise ValueError("zero points must be integers")
        zero_bits, zmin = _zero_window(z, *s.shape)
        if zero_bits > MAX_CODE_BITS:
            raise ValueError(f"zero points spread over {zero_bits} bits; at most {MAX_CODE_BITS} are supported")
        zi = z.to(torch.int64)
        outside = (zi < zmin) | (zi >= zmin + 2**zero_bits)
        fix_index = outside.flatten().nonzero().flatten()
        fixes = (fix_index.to(torch.int32), z.flatten()[fix_index]) if fix_index.numel() else (None, None)
        sf8 = sf8_encode(s)
        stored_scale, base = sf8 if sf8 is not None else (compact_float(s), None)
        packed = cls(pack_codes(q - qmin, bits), stored_scale, base,
                     pack_codes(torch.where(outside, 0, zi - zmin), zero_bits), zero_bits, zmin, sizes, bits, shape,
                     qmin, *fixes)
        if weight_hat is not None:  # belt and braces: the stored form, not just the codes handed in
            w_hat = weight_hat.detach().cpu()
            if not bitwise_equal(packed.dequantize(w_hat.dtype), w_hat):
                raise ValueError("weight does not dequantize bitwise from its codes and grid")
        return packed

    @property
    def scale_format(self) -> str:
        return "sf8" if self.scale_base is not None else {torch.float16: "fp16"}.get(self.scale.dtype, "fp32")

    def group_scale(self) -> torch.Tensor:
        """(rows, groups) fp32 scales, exactly the values the quantizer used."""
        if self.scale_base is not None:
            return sf8_decode(self.scale, self.scale_base)
        return self.scale.float()

    def group_zero(self) -> torch.Tensor:
        """(rows, groups) fp32 integer zero points."""
        zero = (unpack_codes(self.zero, self.zero_bits, len(self.group_sizes)) + self.zero_base).float()
        if self.zero_fix_index is not None:
            zero.view(-1)[self.zero_fix_index.to(torch.int64)] = self.zero_fix_value
        return zero

    @property
    def zero_exceptions(self) -> int:
        return 0 if self.zero_fix_index is None else self.zero_fix_index.numel()

    def integer_codes(self) -> torch.Tensor:
        """(rows, cols) int64: the codes as the quantizer gave them (stored code + qmin)."""
        return unpack_codes(self.codes, self.bits, self.shape[1]) + self.qmin

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """quant.grid's (q - zero) * scale in fp32, then cast: the quantizer's own arithmetic, so bitwise equal."""
        q = self.integer_codes().float()
        scale = expand_groups(self.group_scale(), self.group_sizes)
        zero = expand_groups(self.group_zero(), self.group_sizes)
        return dequantize(q, scale, zero).to(dtype)

    def meta(self) -> dict:
        return {"kind": "affine", "version": VERSION, "bits": self.bits, "shape": list(self.shape),
                "group_sizes": list(self.group_sizes), "qmin": self.qmin, "scale_format": self.scale_format,
                "zero_bits": self.zero_bits, "zero_base": self.zero_base, "zero_exceptions": self.zero_exceptions}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.codes": self.codes, f"{prefix}.scale": self.scale, f"{prefix}.zero": self.zero}
        if self.scale_base is not None:
            out[f"{prefix}.scale_base"] = self.scale_base
        if self.zero_fix_index is not None:
            out[f"{prefix}.zero_fix_index"], out[f"{prefix}.zero_fix_value"] = self.zero_fix_index, self.zero_fix_value
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> "PackedAffine":
        """Validate names, dtypes and shapes against ``meta``; ValueError naming the first problem."""
        check_meta(meta, "affine")
        try:
            bits, qmin, zero_bits, zero_base, fixes = (int(meta[k]) for k in ("bits", "qmin", "zero_bits", "zero_base",
                                                                             "zero_exceptions"))
            shape, sizes = check_layout(tuple(meta["shape"]), meta["group_sizes"])
            fmt = meta["scale_format"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"packed weight {prefix}: bad or missing meta field {err}") from None
        check_bits(bits)
        check_bits(zero_bits)
        if qmin not in (0, -(2 ** (bits - 1))):
            raise ValueError(f"packed weight {prefix}: qmin {qmin} is not 0 or -2^(bits-1)")
        rows, groups = shape[0], len(sizes)
        codes = require(tensors, f"{prefix}.codes", torch.uint8, (rows, packed_row_bytes(shape[1], bits)))
        zero = require(tensors, f"{prefix}.zero", torch.uint8, (rows, packed_row_bytes(groups, zero_bits)))
        dtypes = {"sf8": torch.uint8, "fp16": torch.float16, "fp32": torch.float32}
        if fmt not in dtypes:
            raise ValueError(f"packed weight {prefix}: unknown scale format {fmt!r}")
        scale = require(tensors, f"{prefix}.scale", dtypes[fmt], (rows, groups))
        base = require(tensors, f"{prefix}.scale_base", torch.int8, (rows,)) if fmt == "sf8" else None
        fix_index = fix_value = None
        if fixes:
            fix_index = require(tensors, f"{prefix}.zero_fix_index", torch.int32, (fixes,))
            fix_value = require(tensors, f"{prefix}.zero_fix_value", torch.float32, (fixes,))
            if int(fix_index.min()) < 0 or int(fix_index.max()) >= rows * groups:
                raise ValueError(f"packed weight {prefix}: zero exception index outside ({rows}, {groups})")
        return cls(codes, scale, base, zero, zero_bits, zero_base, sizes, bits, shape, qmin, fix_index, fix_value)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors("").values())
