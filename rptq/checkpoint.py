"""Quantized blocks on disk: one safetensors file per block, plus the rest of the model.

A block file holds everything its forward needs: each quantized linear as packed integer
codes with its grid (``qweight.<linear>.*``, see rptq/packed_weights.py; unquantized
linears stay float ``layer.<linear>.weight``), the other layer tensors, the norm gathers,
each activation quantizer's spec and parameters, the online transforms, and any
architecture buffers (Llama's rotary-table gathers). The same files serve three uses:
``--save_quantized`` / ``--load_quantized``, resumable calibration, and out-of-core
calibration (blocks leave memory once written). Reading checks every name and shape
against the model being filled, so a corrupt or mismatched file is one clear error.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import atomic_write, atomic_write_text
from models.block import QuantBlock
from quant.quantizer import ActQuantizer, QuantSpec
from rptq.packed_weights import describe, pack_linear, packed_meta, size_section, unpack_linear
from quant.transforms import transform_from_state

FORMAT = "rptq-block-v3"  # v3: quantized linears as packed codes (v2: float weights, still read)
READABLE = ("rptq-block-v2", FORMAT)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A block file or checkpoint directory that cannot be read back (one line, names the file)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata={k: json.dumps(v) for k, v in (metadata or {}).items()}))


def read_tensors(path: Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    if not Path(path).is_file():
        raise CheckpointError(f"missing file {Path(path).name}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            return {name: handle.get_tensor(name) for name in handle.keys()}, meta
    except Exception as exc:  # safetensors' own errors, truncated files, bad JSON in the header
        raise CheckpointError(f"{Path(path).name} is not a readable safetensors file ({_first_line(exc)})") from None


def _small_index(perm: torch.Tensor) -> torch.Tensor:
    """A gather in the narrowest integer type that holds it (read back as int64)."""
    return perm.to(torch.int16 if perm.numel() <= torch.iinfo(torch.int16).max else torch.int32)


def save_block(block: QuantBlock, path: Path) -> None:
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
                           "unit_grid": spec.unit_grid,
                           "group_sizes": list(spec.group_sizes) if spec.group_sizes is not None else None}
            if tap.scale is not None:
                tensors[f"tap.{point}.scale"], tensors[f"tap.{point}.zero"] = tap.scale, tap.zero
    online = {}
    for point, steps in block.online.items():
        online[point] = [t.kind for t in steps.steps]
        for i, t in enumerate(steps.steps):
            tensors.update({f"online.{point}.{i}.{name}": value for name, value in t.state().items()})
    atomic_save(tensors, path, {"format": FORMAT, "taps": taps, "online": online, "packed": packed})


def _check_tensors(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str, prefix: str = "",
                   hint: str = "") -> None:
    """Every tensor ``want`` has, with its shape; nothing else."""
    for key, ref in want.items():
        if key not in got:
            raise CheckpointError(f"{where}: missing tensor {prefix}{key}")
        if tuple(got[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: {prefix}{key} has shape {tuple(got[key].shape)}, the model's config "
                                  f"needs {tuple(ref.shape)}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {prefix}{extra[0]}{hint}")


def _check_layer_state(layer: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the layer has, with its shape; nothing else (the layer may be a meta skeleton)."""
    _check_tensors(layer.state_dict(), state, where, "layer.", " (a block of another model?)")


def _gather(perm: torch.Tensor, size: int, where: str, point: str) -> torch.Tensor:
    perm = perm.to(torch.int64)
    if perm.shape != (size,) or not torch.equal(perm.sort().values, torch.arange(size)):
        raise CheckpointError(f"{where}: gather.{point} is not a permutation of the norm's {size} channels")
    return perm


def load_block(block: QuantBlock, path: Path, device="cpu") -> QuantBlock:
    """Fill a freshly made block (its layer may be an empty skeleton) from ``path``.

    Raises :class:`CheckpointError` (one line) for an unknown format or any missing,
    unexpected or wrongly shaped tensor, before the block is touched.
    """
    where = Path(path).name
    tensors, meta = read_tensors(path)  # unpacked on the CPU: the bitwise guarantee is CPU arithmetic
    if meta.get("format") not in READABLE:
        raise CheckpointError(f"{where} has block format {meta.get('format')!r}; this version reads "
                              f"{', '.join(READABLE)}")
    layer_state = {k[len("layer."):]: v for k, v in tensors.items() if k.startswith("layer.")}
    codes = {}
    try:
        for name, pmeta in meta.get("packed", {}).items():
            layer_state[f"{name}.weight"], codes[name] = unpack_linear(f"qweight.{name}", tensors, pmeta)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {_first_line(exc)}") from None
    _check_layer_state(block.layer, layer_state, where)
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
            qspec = QuantSpec(tap["bits"], groups, tap["dynamic"], tap["grid"], tap["clip"], tap["unit_grid"])
            taps[point] = ActQuantizer.from_params(qspec, tensors.get(f"tap.{point}.scale"),
                                                   tensors.get(f"tap.{point}.zero"))
            if qspec.enabled and qspec.dynamic is None and not qspec.unit_grid and taps[point].scale is None:
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
        raise CheckpointError(f"{where}: bad quantizer or transform entry ({_first_line(exc)})") from None
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
        raise CheckpointError(f"{Path(path).name} is not a readable safetensors file ({_first_line(exc)})") from None

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


class LayerStore:
    """A directory of block files ``block-00003.safetensors`` and the resume state."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def block_path(self, index: int) -> Path:
        return self.root / f"block-{index:05d}.safetensors"

    def save_block(self, index: int, block: QuantBlock) -> None:
        save_block(block, self.block_path(index))

    def load_block(self, index: int, block: QuantBlock, device="cpu") -> QuantBlock:
        return load_block(block, self.block_path(index), device)

    # -- resumable calibration ------------------------------------------------------------
    def save_progress(self, next_layer: int, inputs: torch.Tensor, fingerprint: str) -> None:
        """Written after a layer's block file: the inputs of the next layer, then the marker."""
        atomic_save({"inputs": inputs}, self.root / "inputs.safetensors")
        atomic_write_text(self.root / "state.json", json.dumps({"fingerprint": fingerprint, "next_layer": next_layer}))

    def progress(self) -> dict | None:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def load_inputs(self, device="cpu") -> torch.Tensor:
        return read_tensors(self.root / "inputs.safetensors", device)[0]["inputs"]

    def finish(self) -> None:
        """Calibration complete: the activations are no longer needed; keep the blocks."""
        (self.root / "inputs.safetensors").unlink(missing_ok=True)
        state = self.progress() or {}
        state["complete"] = True
        atomic_write_text(self.root / "state.json", json.dumps(state))


# -- a whole quantized model ---------------------------------------------------------------
def _resident_state(model, adapter) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (embeddings, final norm, head unless tied)."""
    prefix = adapter.layers_path + "."
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(prefix) and not (tied and k == "lm_head.weight")}


def _files_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file())


def save_quantized(out_dir: str | os.PathLike, model, adapter, tokenizer, info: dict,
                   blocks_from: LayerStore | None = None) -> dict:
    """Fused, quantized model: block files + resident tensors + config/tokenizer + quant.json.

    ``blocks_from``: copy block files from this store (out-of-core runs) instead of the model.
    Returns the size section (also in quant.json): decoder weights as stored vs fp16.
    """
    import shutil

    store = LayerStore(out_dir)
    layers = adapter.layers(model)
    linear_names = tuple(adapter.block_spec(model.config).linear_inputs)
    linears = []
    for i in range(len(layers)):
        if blocks_from is not None:
            store.root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(blocks_from.block_path(i), store.block_path(i))
        else:
            store.save_block(i, layers[i])
        linears.append(block_file_summary(store.block_path(i), linear_names))
    atomic_save(_resident_state(model, adapter), store.root / "resident.safetensors", {"format": FORMAT})
    config = model.config
    if hasattr(config, "quantization_config"):  # GGUF loads carry one; our weights are plain tensors
        del config.quantization_config
    config.save_pretrained(str(store.root))
    tokenizer.save_pretrained(str(store.root))
    (store.root / "quant.json").unlink(missing_ok=True)  # an old one would count in the size
    size = size_section(linears, _files_bytes(store.root))
    manifest = {"format": FORMAT, "num_layers": len(layers), "size": size,
                "linears": [{name: {k: e[k] for k in ("kind", "shape", "bits", "groups", "scale_format") if k in e}
                             for name, e in layer.items()} for layer in linears], **info}
    # Last: its presence marks a complete save.
    atomic_write_text(store.root / "quant.json", json.dumps(manifest, indent=1))
    return size


def _read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise CheckpointError("no such directory")
    if not (root / "quant.json").is_file():
        raise CheckpointError("not a complete --save_quantized directory (no quant.json)")
    try:
        info = json.loads((root / "quant.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"quant.json is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(info, dict) or info.get("format") not in READABLE:
        fmt = info.get("format") if isinstance(info, dict) else None
        raise CheckpointError(f"unknown checkpoint format {fmt!r} (this version reads {', '.join(READABLE)}); "
                              "use the version that wrote it")
    return info


def _check_resident(model, adapter, resident: dict[str, torch.Tensor]) -> None:
    _check_tensors(_resident_state(model, adapter), resident, "resident.safetensors")


def _check_linears(block: QuantBlock, listed: dict, index: int) -> None:
    """quant.json's per-linear shapes and bits agree with what the block file held."""
    for name, entry in listed.items():
        weight = block.layer.get_submodule(name).weight
        codes = block.weight_codes.get(name, {})
        bits = len(codes["planes"]) if codes.get("kind") == "binary" else codes.get("bits", 8 * weight.element_size())
        if list(weight.shape) != entry.get("shape") or bits != entry.get("bits"):
            raise CheckpointError(f"block {index} {name}: quant.json lists {entry.get('shape')} at "
                                  f"{entry.get('bits')} bits, the block file holds {list(weight.shape)} at {bits}")


def load_quantized(directory: str | os.PathLike, device: torch.device):
    """Returns (model, tokenizer, adapter, info) from a :func:`save_quantized` directory.

    A missing, corrupt or mismatched directory is a one-line UserError naming it; nothing
    is evaluated or written before every file has been read and checked.
    """
    from common.errors import UserError

    root = Path(directory)
    try:
        return _load_quantized(root, device)
    except CheckpointError as exc:
        raise UserError(f"--load_quantized {root}: {exc}; re-create it with --save_quantized") from None


def _load_quantized(root: Path, device: torch.device):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.loading import default_dtype
    from models.registry import adapter_for

    info = _read_manifest(root)
    try:
        config = AutoConfig.from_pretrained(str(root))
        adapter = adapter_for(config)
    except Exception as exc:  # missing/corrupt config.json, an architecture we do not know
        raise CheckpointError(f"config.json: {_first_line(exc)}") from None
    dtype = default_dtype(device)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = adapter.layers(model)
    if info.get("num_layers") != len(layers):
        raise CheckpointError(f"quant.json lists {info.get('num_layers')} layers, config.json {len(layers)}")
    resident, _ = read_tensors(root / "resident.safetensors")
    _check_resident(model, adapter, resident)
    model.load_state_dict({k: v.to(dtype) for k, v in resident.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    spec = adapter.block_spec(config)
    store = LayerStore(root)
    listed = info.get("linears") or [{}] * len(layers)
    for i in range(len(layers)):
        layers[i] = store.load_block(i, adapter.make_block(layers[i], spec), device)
        _check_linears(layers[i], listed[i] if i < len(listed) else {}, i)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:
        raise CheckpointError(f"tokenizer: {_first_line(exc)}") from None
    return model.to(device).eval(), tokenizer, adapter, info
