"""Quantized weights as packed integer codes, for checkpoints that are actually small.

A fake-quantized weight is a float tensor that only takes grid values; storing the
grid index (b bits) plus the grid (scale, zero per row x input group) instead of the
float is what shrinks a checkpoint. Everything here is exact: a container rebuilt
from its tensors dequantizes to the bits that were saved, because it evaluates the
same fp32 expression the quantizer did (``quant.quantizer.fake_quant``).

Storage choices (all recorded in a small JSON-able ``meta`` dict):

* codes: ``b`` bits per weight, packed densely along each row (3-bit: 8 codes in 3
  bytes), little-endian bit order, each row padded to a whole byte;
* zero points: per tensor, ``zero - zero_base`` packed at ``zero_bits`` bits, the window
  [zero_base, zero_base + 2^zero_bits) chosen to minimise bytes; the few zeros outside it
  (a constant group -- a one-channel cluster -- gets scale 1e-8 and a zero point ~1e8 on
  a grid that excludes 0) are stored exactly beside it as (index, value) exceptions;
* scales: ``sf8`` (1 byte: 4-bit exponent, 4-bit mantissa, plus one int8 exponent
  base per row) when every scale lies on that grid, else fp16 when exactly
  representable, else fp32. Only scales produced by :func:`snap_scales_sf8` are sf8;
* binary-coded weights (GPTQT): k bit-planes at 1 bit per weight, alpha and offset
  per (row, group) in fp16 when exact, else fp32 (see :class:`PackedBinary`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bitpack import (MAX_CODE_BITS, bit_pattern, bitwise_equal, check_bits, compact_float, pack_codes,
                      packed_row_bytes, sf8_decode, sf8_encode, snap_scales_sf8, unpack_codes)
from .quantizer import expand_groups

__all__ = ["PackedAffine", "PackedBinary", "SizeReport", "affine_nbytes", "load_packed", "pack_codes",
           "packed_nbytes", "packed_row_bytes", "size_report", "snap_scales_sf8", "unpack_codes"]
VERSION = 1


def _recover_codes(w_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, qmin: int):
    """Codes q in [qmin, qmin + 2^b) with ((q - zero) * scale).to(w_hat.dtype) == w_hat bitwise.

    round(w/scale + zero) finds q except where |zero| is so large that q - zero is rounded
    in fp32 (a constant group under a grid that excludes 0 gets scale 1e-8 and zero ~1e8);
    there several codes give the same float, and the few misses are matched by trying
    every code. None when the weight is not on the grid.
    """
    qmax = qmin + 2**bits - 1
    target = bit_pattern(w_hat)
    q = torch.round(w_hat.float() / scale + zero).nan_to_num(qmin).clamp(qmin, qmax)
    miss = (bit_pattern(((q - zero) * scale).to(w_hat.dtype)) != target).nonzero()
    levels = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    for chunk in miss.split(1 << 14):  # a weight off the grid fails in the first chunk
        r, c = chunk.unbind(-1)
        trial = ((levels - zero[r, c].unsqueeze(-1)) * scale[r, c].unsqueeze(-1)).to(w_hat.dtype)
        hit = bit_pattern(trial) == target[r, c].unsqueeze(-1)
        if not bool(hit.any(-1).all()):
            return None
        q[r, c] = levels[hit.to(torch.uint8).argmax(-1)]
    return q


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


# -- containers ----------------------------------------------------------------------------
def _check_layout(shape, group_sizes) -> tuple[tuple[int, int], tuple[int, ...]]:
    if len(shape) != 2 or any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"weight shape must be two non-negative ints, got {shape!r}")
    sizes = tuple(group_sizes) if group_sizes is not None else (shape[1],)
    if any(not isinstance(s, int) or s <= 0 for s in sizes) or sum(sizes) != shape[1]:
        raise ValueError(f"group sizes {list(sizes)[:8]}... do not split {shape[1]} columns")
    return (shape[0], shape[1]), sizes


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


def _require(tensors: dict, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"packed weight: missing tensor {name}")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"packed weight: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def _check_meta(meta: dict, kind: str) -> None:
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ValueError(f"packed weight: expected kind {kind!r}, got {meta.get('kind') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"packed weight: unsupported version {meta.get('version')!r} (this code reads {VERSION})")


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
    def from_quantized(cls, weight_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       group_sizes: tuple[int, ...] | None = None, qmin: int = 0) -> "PackedAffine":
        """Recover integer codes from a fake-quantized weight; raises unless reload is bitwise exact.

        ``scale``/``zero``: (rows, groups), or per column (rows, cols) as weight_params gives.
        """
        check_bits(bits)
        if qmin not in (0, -(2 ** (bits - 1))):
            raise ValueError(f"qmin must be 0 or {-(2 ** (bits - 1))} for {bits} bits, got {qmin}")
        shape, sizes = _check_layout(tuple(weight_hat.shape), group_sizes)
        s, z = _per_group(scale, shape[0], sizes, "scale"), _per_group(zero, shape[0], sizes, "zero")
        if not torch.equal(z, z.round()) or not bool(z.isfinite().all()):
            raise ValueError("zero points must be integers")
        w_hat = weight_hat.detach().cpu()
        q = _recover_codes(w_hat, expand_groups(s, sizes), expand_groups(z, sizes), bits, qmin)
        if q is None:
            raise ValueError(f"weight is not on its {bits}-bit grid (no code in range reproduces it)")
        zero_bits, zmin = _zero_window(z, *s.shape)
        if zero_bits > MAX_CODE_BITS:
            raise ValueError(f"zero points spread over {zero_bits} bits; at most {MAX_CODE_BITS} are supported")
        zi = z.to(torch.int64)
        outside = (zi < zmin) | (zi >= zmin + 2**zero_bits)
        fix_index = outside.flatten().nonzero().flatten()
        fixes = (fix_index.to(torch.int32), z.flatten()[fix_index]) if fix_index.numel() else (None, None)
        sf8 = sf8_encode(s)
        stored_scale, base = sf8 if sf8 is not None else (compact_float(s), None)
        packed = cls(pack_codes((q - qmin).to(torch.int64), bits), stored_scale, base,
                     pack_codes(torch.where(outside, 0, zi - zmin), zero_bits), zero_bits, zmin, sizes, bits, shape,
                     qmin, *fixes)
        if not bitwise_equal(packed.dequantize(w_hat.dtype), w_hat):  # belt and braces: the stored form
            raise ValueError("weight does not dequantize bitwise from its stored codes and grid")
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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(q - zero) * scale in fp32, then cast: fake_quant's own arithmetic, so bitwise equal."""
        q = (unpack_codes(self.codes, self.bits, self.shape[1]) + self.qmin).float()
        scale = expand_groups(self.group_scale(), self.group_sizes)
        zero = expand_groups(self.group_zero(), self.group_sizes)
        return ((q - zero) * scale).to(dtype)

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
        _check_meta(meta, "affine")
        try:
            bits, qmin, zero_bits, zero_base, fixes = (int(meta[k]) for k in ("bits", "qmin", "zero_bits", "zero_base",
                                                                             "zero_exceptions"))
            shape, sizes = _check_layout(tuple(meta["shape"]), meta["group_sizes"])
            fmt = meta["scale_format"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"packed weight {prefix}: bad or missing meta field {err}") from None
        check_bits(bits)
        check_bits(zero_bits)
        if qmin not in (0, -(2 ** (bits - 1))):
            raise ValueError(f"packed weight {prefix}: qmin {qmin} is not 0 or -2^(bits-1)")
        rows, groups = shape[0], len(sizes)
        codes = _require(tensors, f"{prefix}.codes", torch.uint8, (rows, packed_row_bytes(shape[1], bits)))
        zero = _require(tensors, f"{prefix}.zero", torch.uint8, (rows, packed_row_bytes(groups, zero_bits)))
        dtypes = {"sf8": torch.uint8, "fp16": torch.float16, "fp32": torch.float32}
        if fmt not in dtypes:
            raise ValueError(f"packed weight {prefix}: unknown scale format {fmt!r}")
        scale = _require(tensors, f"{prefix}.scale", dtypes[fmt], (rows, groups))
        base = _require(tensors, f"{prefix}.scale_base", torch.int8, (rows,)) if fmt == "sf8" else None
        fix_index = fix_value = None
        if fixes:
            fix_index = _require(tensors, f"{prefix}.zero_fix_index", torch.int32, (fixes,))
            fix_value = _require(tensors, f"{prefix}.zero_fix_value", torch.float32, (fixes,))
            if int(fix_index.min()) < 0 or int(fix_index.max()) >= rows * groups:
                raise ValueError(f"packed weight {prefix}: zero exception index outside ({rows}, {groups})")
        return cls(codes, scale, base, zero, zero_bits, zero_base, sizes, bits, shape, qmin, fix_index, fix_value)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors("").values())


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
        shape, sizes = _check_layout((rows, cols), group_sizes)
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
        _check_meta(meta, "binary")
        floats = {"fp16": torch.float16, "fp32": torch.float32}
        try:
            k = int(meta["k"])
            shape, sizes = _check_layout(tuple(meta["shape"]), meta["group_sizes"])
            adt, odt = floats[meta["alpha_dtype"]], floats[meta["offset_dtype"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"packed weight {prefix}: bad or missing meta field {err}") from None
        if k < 1:
            raise ValueError(f"packed weight {prefix}: k must be >= 1, got {k}")
        rows, groups = shape[0], len(sizes)
        planes = _require(tensors, f"{prefix}.planes", torch.uint8, (k, rows, packed_row_bytes(shape[1], 1)))
        alpha = _require(tensors, f"{prefix}.alpha", adt, (rows, groups, k))
        offset = _require(tensors, f"{prefix}.offset", odt, (rows, groups))
        return cls(planes, alpha, offset, sizes, shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors("").values())


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
