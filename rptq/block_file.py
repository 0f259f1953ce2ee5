"""One quantized decoder block as a safetensors file: the format, writing, reading, checking.

A block file holds everything its forward needs: each quantized linear as packed integer
codes with its grid (``qweight.<linear>.*``, see rptq/packed_weights.py; unquantized
linears stay float ``layer.<linear>.weight``), the other layer tensors, the norm gathers,
each activation quantizer's spec and parameters, the online transforms, and any
architecture buffers (Llama's rotary-table gathers). The same files serve three uses:
``--save_quantized`` / ``--load_quantized`` (rptq/checkpoint.py), resumable calibration and
out-of-core calibration (rptq/layer_store.py; blocks leave memory once written). Reading
checks every name and shape against the model being filled, so a corrupt or mismatched
file is one clear error.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from models.block import QuantBlock
from quant.quantizer import ActQuantizer, QuantSpec
from quant.transforms import transform_from_state

from .packed_weights import describe, pack_linear, packed_meta, unpack_linear
from .tensor_file import CheckpointError, atomic_save, check_tensors, first_line, read_tensors

FORMAT = "rptq-block-v3"  # v3: quantized linears as packed codes (v2: float weights, still read)
READABLE = ("rptq-block-v2", FORMAT)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _small_index(perm: torch.Tensor) -> torch.Tensor:
    """A gather in the narrowest integer type that holds it (read back as int64)."""
    return perm.to(torch.int16 if perm.numel() <= torch.iinfo(torch.int16).max else torch.int32)


def save_block(block: QuantBlock, path: Path, identity: dict | None = None) -> None:
    """``identity``: where the file belongs ({"layer": i, "checkpoint": id}), checked on load."""
    state = block.layer.state_dict()
    tensors, packed = {}, {}
    for name, codes in block.weight_codes.items():
        weight = state[f"{name}.weight"]
        try:
            container = pack_linear(weight, codes)
        except ValueError as exc:  # exactness first: a weight that would not reload bitwise stays float
            warnings.warn(f"{Path(path).name}: {name} is stored as a float tensor, not packed ({exc})", stacklevel=2)
            continue
        tensors.update(container.to_tensors(f"qweight.{name}"))
        packed[name] = packed_meta(container, codes, weight)
    tensors.update({f"layer.{k}": v for k, v in state.items()
                    if not (k.endswith(".weight") and k[:-len(".weight")] in packed)})
    tensors.update({f"gather.{p}": _small_index(perm) for p, perm in block.gathers.items() if perm is not None})
    tensors.update({f"buffer.{n}": b for n, b in block.named_buffers(recurse=False) if b is not None})
    taps = {}
    for point, tap in block.taps.items():
        if isinstance(tap, ActQuantizer):
            spec = tap.spec
            taps[point] = {"bits": spec.bits, "dynamic": spec.dynamic, "grid": spec.grid, "clip": spec.clip,
                           "unit_grid": spec.unit_grid, "zero_in_range": spec.zero_in_range, "clip_low": spec.clip_low,
                           "group_sizes": list(spec.group_sizes) if spec.group_sizes is not None else None}
            if tap.scale is not None:
                tensors[f"tap.{point}.scale"], tensors[f"tap.{point}.zero"] = tap.scale, tap.zero
    online = {}
    for point, steps in block.online.items():
        online[point] = [t.kind for t in steps.steps]
        for i, t in enumerate(steps.steps):
            tensors.update({f"online.{point}.{i}.{name}": value for name, value in t.state().items()})
    atomic_save(tensors, path, {"format": FORMAT, "taps": taps, "online": online, "packed": packed, **(identity or {})})


def restamp_block(source: Path, dest: Path, identity: dict) -> None:
    """A copy of a block file (an out-of-core run's) that records where it now belongs."""
    tensors, meta = read_tensors(source)
    atomic_save(tensors, dest, {**meta, **identity})


def _check_identity(meta: dict, expect: dict, where: str) -> None:
    """A block file is the layer and checkpoint its name and quant.json say: not swapped, renamed or copied in."""
    if any(key not in meta for key in expect):
        raise CheckpointError(f"{where} records no layer index or checkpoint id (not saved as part of this "
                              "checkpoint)")
    if meta["layer"] != expect["layer"]:
        raise CheckpointError(f"{where} holds layer {meta['layer']}, not layer {expect['layer']} "
                              "(block files swapped or renamed)")
    if meta["checkpoint"] != expect["checkpoint"]:
        raise CheckpointError(f"{where} belongs to checkpoint {meta['checkpoint']}, not this one "
                              f"({expect['checkpoint']}; copied in from another checkpoint)")


def _check_layer_state(layer: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the layer has, with its shape; nothing else (the layer may be a meta skeleton)."""
    check_tensors(layer.state_dict(), state, where, "layer.", " (a block of another model?)")


def _gather(perm: torch.Tensor, size: int, where: str, point: str) -> torch.Tensor:
    perm = perm.to(torch.int64)
    if perm.shape != (size,) or not torch.equal(perm.sort().values, torch.arange(size)):
        raise CheckpointError(f"{where}: gather.{point} is not a permutation of the norm's {size} channels")
    return perm


def _float_dtype(layer: torch.nn.Module) -> torch.dtype:
    """The dtype the model around a block runs in: its skeleton's (uniform in a Hugging Face model)."""
    return next(p.dtype for p in layer.parameters() if p.is_floating_point())


def load_block(block: QuantBlock, path: Path, device="cpu", expect: dict | None = None) -> QuantBlock:
    """Fill a freshly made block (its layer may be an empty skeleton) from ``path``.

    The layer's float tensors take the skeleton's dtype -- the run's, as the model around it was
    made (models.loading.default_dtype for the device, or the model being calibrated) -- whatever
    dtype the file was written in; quantizer ranges and online transforms stay fp32, as calibration
    keeps them on every device.

    Raises :class:`CheckpointError` (one line) for an unknown format, an identity other than
    ``expect`` ({"layer", "checkpoint"}), or any missing, unexpected or wrongly shaped tensor,
    before the block is touched.
    """
    where = Path(path).name
    tensors, meta = read_tensors(path)  # unpacked on the CPU: the bitwise guarantee is CPU arithmetic
    if meta.get("format") not in READABLE:
        raise CheckpointError(f"{where} has block format {meta.get('format')!r}; this version reads "
                              f"{', '.join(READABLE)}")
    if expect is not None:
        _check_identity(meta, expect, where)
    layer_state = {k[len("layer."):]: v for k, v in tensors.items() if k.startswith("layer.")}
    codes = {}
    try:
        for name, pmeta in meta.get("packed", {}).items():
            layer_state[f"{name}.weight"], codes[name] = unpack_linear(f"qweight.{name}", tensors, pmeta)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {first_line(exc)}") from None
    _check_layer_state(block.layer, layer_state, where)
    # A block saved on a GPU (fp16) and read on the CPU (fp32), or the reverse, would otherwise keep
    # its saved dtype beside resident tensors in the run's. Packed weights were rebuilt above in their
    # saved dtype -- bit for bit the calibrated weight -- and are cast here, one rounding, like the
    # in-memory model cast: dequantizing in the target dtype would round scale and zero first.
    dtype = _float_dtype(block.layer)
    layer_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in layer_state.items()}
    spec = block.spec
    gathers = {}
    for edge in spec.norm_edges:
        if f"gather.{edge.point}" in tensors:
            size = block.layer.get_submodule(edge.norm).weight.shape[0]
            gathers[edge.point] = _gather(tensors[f"gather.{edge.point}"], size, where, edge.point)
    taps, online = {}, {}
    try:
        for point, tap in meta["taps"].items():
            if point not in block.taps:
                raise CheckpointError(f"{where}: quantizer for unknown point {point!r}")
            groups = tuple(tap["group_sizes"]) if tap["group_sizes"] is not None else None
            qspec = QuantSpec(tap["bits"], groups, tap["dynamic"], tap["grid"], tap["clip"], tap["unit_grid"],
                              tap.get("zero_in_range", False), tap.get("clip_low"))
            taps[point] = ActQuantizer.from_params(qspec, tensors.get(f"tap.{point}.scale"),
                                                   tensors.get(f"tap.{point}.zero"))
            if qspec.static and taps[point].scale is None:
                raise CheckpointError(f"{where}: missing tensor tap.{point}.scale")
        for point, kinds in meta.get("online", {}).items():
            if point not in block.online:
                raise CheckpointError(f"{where}: online transform at unknown point {point!r}")
            online[point] = []
            for i, kind in enumerate(kinds):
                prefix = f"online.{point}.{i}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                online[point].append(transform_from_state(kind, state))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad quantizer or transform entry ({first_line(exc)})") from None
    buffers = {k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")}
    unknown = [b for b in buffers if b not in block._buffers]
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensor buffer.{unknown[0]}")

    block.layer.load_state_dict(layer_state, assign=True, strict=True)
    block.weight_codes.update(codes)
    for point in block.gathers:
        block.gathers[point] = gathers[point].to(device) if point in gathers else None
    for name, value in buffers.items():
        setattr(block, name, value)
    for point, quantizer in taps.items():
        block.taps[point] = quantizer
    for point, steps in online.items():
        block.online[point].steps.extend(steps)
    return block.to(device)


def block_file_summary(path: Path, linears) -> dict[str, dict]:
    """Per linear of a block file, from its header only: kind, shape, bits, bytes stored, fp16 bytes."""
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            sizes = {k: (handle.get_slice(k).get_shape(), handle.get_slice(k).get_dtype()) for k in handle.keys()}
    except Exception as exc:
        raise CheckpointError(f"{Path(path).name} is not a readable safetensors file ({first_line(exc)})") from None

    def nbytes(key):
        shape, dtype = sizes[key]
        return int(torch.tensor(shape).prod()) * _ITEMSIZE[dtype]

    for name in linears:
        if name in meta.get("packed", {}):
            prefix = f"qweight.{name}."
            stored = sum(nbytes(k) for k in sizes if k.startswith(prefix))
            out[name] = describe(meta["packed"][name], stored)
        elif f"layer.{name}.weight" in sizes:
            shape, dtype = sizes[f"layer.{name}.weight"]
            out[name] = {"kind": "float", "shape": list(shape), "bits": 8 * _ITEMSIZE[dtype],
                         "bytes": nbytes(f"layer.{name}.weight"), "fp16_bytes": 2 * shape[0] * shape[1]}
    return out

