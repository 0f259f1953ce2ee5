"""What the packed containers (quant.packed_affine, quant.packed_binary) check alike: a (rows, cols)
weight's split into contiguous input groups, each stored tensor's name, dtype and shape, and the
kind and format version in its meta -- so a corrupt block file fails with one line naming the problem.
"""
from __future__ import annotations

import torch

VERSION = 1


def check_layout(shape, group_sizes) -> tuple[tuple[int, int], tuple[int, ...]]:
    if len(shape) != 2 or any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"weight shape must be two non-negative ints, got {shape!r}")
    sizes = tuple(group_sizes) if group_sizes is not None else (shape[1],)
    if any(not isinstance(s, int) or s <= 0 for s in sizes) or sum(sizes) != shape[1]:
        raise ValueError(f"group sizes {list(sizes)[:8]}... do not split {shape[1]} columns")
    return (shape[0], shape[1]), sizes


def require(tensors: dict, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"packed weight: missing tensor {name}")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"packed weight: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def check_meta(meta: dict, kind: str) -> None:
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ValueError(f"packed weight: expected kind {kind!r}, got {meta.get('kind') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"packed weight: unsupported version {meta.get('version')!r} (this code reads {VERSION})")
