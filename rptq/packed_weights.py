"""A block's quantized linears as packed codes in its block file, and back.

``weights.quantize_weights`` leaves, per quantized linear, ``block.weight_codes[name]``:
the integer codes the quantizer produced and the grid they are on (affine: codes, scale/zero
per row x input group, bits, grid name) or its binary code (GPTQT, BCQ: bit planes, alpha,
offset). A block file stores those, packed (``quant.packing``), instead of the float weight.
Reload dequantizes in the dtype the weight had, the quantizer's own arithmetic, so the
rebuilt weight is the saved one bit for bit (``from_codes`` / ``from_planes`` check exactly
that against the weight before anything is written).
"""
from __future__ import annotations

import torch

from quant.packing import PackedAffine, PackedBinary, load_packed
from quant.grid import GRIDS, code_dtype, code_range

Packed = PackedAffine | PackedBinary
_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _qmin(bits: int, grid: str) -> int:
    """The container's code origin: 0 for the full grid; the signed grids (reference, symmetric, quarot)
    live inside -2^(b-1) .. 2^(b-1) - 1."""
    qmin, _ = code_range(bits, grid)
    return 0 if qmin == 0 else -(2 ** (bits - 1))


def pack_linear(weight: torch.Tensor, codes: dict) -> Packed:
    """The packed form of a quantized weight from its codes; ValueError unless it reloads bitwise
    (also when ``codes`` carries no integer codes: they are never recovered from the floats)."""
    if codes.get("kind", "affine") == "binary":
        return PackedBinary.from_planes(codes["planes"], codes["alpha"], codes["offset"], codes.get("group_sizes"),
                                        weight_hat=weight)
    if "codes" not in codes:
        raise ValueError("no integer codes were kept for this weight")
    bits = int(codes["bits"])
    return PackedAffine.from_codes(codes["codes"], codes["scale"], codes["zero"], bits, codes.get("group_sizes"),
                                   qmin=_qmin(bits, codes["grid"]), weight_hat=weight)


def packed_meta(packed: Packed, codes: dict, weight: torch.Tensor) -> dict:
    """What the block file's metadata keeps: the container's own meta, the reload dtype, the grid."""
    extra = {"dtype": str(weight.dtype).removeprefix("torch.")}
    if isinstance(packed, PackedAffine):
        extra["grid"] = codes["grid"]
    return packed.meta() | extra


def unpack_linear(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> tuple[torch.Tensor, dict]:
    """(weight in its saved dtype, the weight_codes entry) from a block file; ValueError if corrupt."""
    dtype = _FLOATS.get(meta.get("dtype")) if isinstance(meta, dict) else None
    if dtype is None:
        raise ValueError(f"packed weight {prefix}: missing or unknown weight dtype in its metadata")
    packed = load_packed(prefix, tensors, meta)
    sizes = packed.group_sizes
    groups = None if len(sizes) == 1 else tuple(sizes)
    if isinstance(packed, PackedBinary):
        codes = {"kind": "binary", "planes": packed.signs() > 0, "alpha": packed.alpha.float(),
                 "offset": packed.offset.float(), "group_sizes": groups}
    else:
        grid = meta.get("grid")
        if grid not in GRIDS or _qmin(packed.bits, grid) != packed.qmin:
            raise ValueError(f"packed weight {prefix}: grid {grid!r} does not match its code origin {packed.qmin}")
        codes = {"kind": "affine", "codes": packed.integer_codes().to(code_dtype(packed.bits, grid)),
                 "scale": packed.group_scale(), "zero": packed.group_zero(), "bits": packed.bits, "grid": grid,
                 "group_sizes": groups}
    return packed.dequantize(dtype), codes


def describe(packed_meta_: dict, nbytes: int) -> dict:
    """One quant.json entry: what a linear's stored form is and what it costs."""
    rows, cols = packed_meta_["shape"]
    entry = {"kind": packed_meta_["kind"], "shape": [rows, cols], "groups": len(packed_meta_["group_sizes"]),
             "bytes": nbytes, "fp16_bytes": 2 * rows * cols}
    if packed_meta_["kind"] == "binary":
        entry.update(bits=packed_meta_["k"], scale_format=packed_meta_["alpha_dtype"])
    else:
        entry.update(bits=packed_meta_["bits"], scale_format=packed_meta_["scale_format"],
                     zero_bits=packed_meta_["zero_bits"], zero_exceptions=packed_meta_["zero_exceptions"])
    return entry


def size_section(linears: list[dict[str, dict]], checkpoint_bytes: int) -> dict:
    """Decoder linear weights as stored against the same weights in fp16 (codes + scales + zeros)."""
    entries = [e for layer in linears for e in layer.values()]
    packed, fp16 = sum(e["bytes"] for e in entries), sum(e["fp16_bytes"] for e in entries)
    return {"decoder_weight_bytes_packed": packed, "decoder_weight_bytes_fp16": fp16,
            "ratio": round(packed / fp16, 6) if fp16 else None,
            "packed_linears": sum(e["kind"] != "float" for e in entries),
            "float_linears": sum(e["kind"] == "float" for e in entries), "checkpoint_bytes": checkpoint_bytes}


def describe_size(size: dict) -> str:
    """The one line a run prints after saving."""
    mib = 2**20
    return (f"{size['decoder_weight_bytes_packed'] / mib:.2f} MiB decoder weights stored vs "
            f"{size['decoder_weight_bytes_fp16'] / mib:.2f} MiB in fp16 ({size['ratio']:.4f}x; "
            f"{size['packed_linears']} packed, {size['float_linears']} float linears); "
            f"{size['checkpoint_bytes'] / mib:.2f} MiB on disk")
