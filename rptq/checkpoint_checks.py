"""A loaded block against quant.json's bit manifest: the quantizers the block file actually holds.

quant.json is plain text; an edited manifest (say 8 bits on a 4-bit model) would label every
result of the checkpoint wrongly. Each block file stores its packed weights' bits and groups and
its activation quantizers' specs, so the manifest's claims are checked against those on load.
"""
from __future__ import annotations

import math

from models.block import QuantBlock
from quant.quantizer import ActQuantizer

from .config import FP
from .tensor_file import CheckpointError


def _fail(index: int, key: str, claim, stored) -> None:
    raise CheckpointError(f"quant.json's bit_manifest says {key} is {claim}, block-{index:05d}.safetensors holds "
                          f"{stored} (quant.json edited?)")


def _check_activation(block: QuantBlock, point: str, entry: dict, index: int) -> None:
    tap = block.taps[point]
    spec = tap.spec if isinstance(tap, ActQuantizer) and tap.spec.enabled else None
    bits = spec.bits if spec is not None else FP
    if entry.get("bits") != bits:
        _fail(index, point, f"{entry.get('bits')} bits", f"{bits} bits")
    if spec is None:
        return
    granularity = str(entry.get("granularity", ""))
    if isinstance(entry.get("static"), bool) and entry["static"] != (spec.dynamic is None):
        _fail(index, point, "static" if entry["static"] else "dynamic", f"{spec.dynamic or 'static'} ranges")
    if granularity.startswith("fixed") != spec.unit_grid:
        _fail(index, point, granularity, spec.granularity)
    if granularity.startswith("tensor") and spec.group_sizes is not None:
        _fail(index, point, granularity, spec.granularity)


def _check_weight(block: QuantBlock, linear: str, entry: dict, index: int) -> None:
    key = f"weight:{linear}"
    codes = block.weight_codes.get(linear)
    if codes is None:  # stored float: unquantized, or off its grid (save_block warned): no bits on file to check
        return
    binary = codes.get("kind") == "binary"
    bits = len(codes["planes"]) if binary else codes["bits"]
    if entry.get("bits") != bits:
        _fail(index, key, f"{entry.get('bits')} bits", f"{bits}-bit codes")
    granularity = str(entry.get("granularity", ""))
    if ("binary-coded" in granularity) != binary:
        _fail(index, key, granularity, "binary codes" if binary else "affine codes")
    groups = len(codes["group_sizes"]) if codes.get("group_sizes") else 1
    columns = block.layer.get_submodule(linear).weight.shape[1]
    if granularity.split(" binary")[0] == "row" and groups != 1:
        _fail(index, key, granularity, f"{groups} groups per row")
    if granularity.startswith("row x group(") and groups != math.ceil(columns / int(granularity[12:].split(")")[0])):
        _fail(index, key, granularity, f"{groups} groups per row")


def check_stored_quantizers(block: QuantBlock, manifest: dict, index: int) -> None:
    """Every point and linear of the block as the manifest describes it (an empty manifest claims nothing)."""
    if not manifest:
        return
    spec = block.spec
    for point in spec.points:
        if point not in manifest:
            raise CheckpointError(f"quant.json's bit_manifest lists no entry for {point} (quant.json edited?)")
        _check_activation(block, point, manifest[point], index)
    for linear in spec.linear_inputs:
        if f"weight:{linear}" not in manifest:
            raise CheckpointError(f"quant.json's bit_manifest lists no entry for weight:{linear} (quant.json edited?)")
        _check_weight(block, linear, manifest[f"weight:{linear}"], index)
