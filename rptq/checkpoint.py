"""A whole quantized model on disk (``--save_quantized`` / ``--load_quantized``).

The directory is a layer store of block files (rptq/layer_store.py, format in
rptq/block_file.py) plus the tensors outside the decoder layers (resident.safetensors),
the HF config and tokenizer, and quant.json, written last so its presence marks a complete
save, and the identity every block file must carry (checkpoint id, layer index), with what made
it (code digest, git commit, the run's model, config and bit manifest). Loading builds an empty HF
model from the config, fills it, and checks every file against it and against quant.json's bit
manifest before anything is evaluated.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from common.atomic import atomic_write_text
from common.errors import UserError
from common.provenance import code_digest
from eval.report import versions
from models.block import QuantBlock
from models.loading import default_dtype
from models.registry import adapter_for

from .block_file import FORMAT, READABLE, block_file_summary
from .checkpoint_checks import check_stored_quantizers
from .checkpoint_dir import interrupted_hint, replacing
from .layer_store import LayerStore
from .packed_weights import size_section
from .tensor_file import CheckpointError, atomic_save, check_tensors, first_line, read_tensors


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
    The directory is written beside ``out_dir`` and replaces it only when complete
    (rptq/checkpoint_dir.py). Returns the size section (also in quant.json): decoder weights as
    stored vs fp16.
    """
    with replacing(out_dir) as work:
        return _write(work, model, adapter, tokenizer, info, blocks_from)


def _write(root: Path, model, adapter, tokenizer, info: dict, blocks_from: LayerStore | None) -> dict:
    store = LayerStore(root)
    checkpoint_id = uuid.uuid4().hex  # each block file records it: a block of another save is refused
    layers = adapter.layers(model)
    linear_names = tuple(adapter.block_spec(model.config).linear_inputs)
    linears = []
    for i in range(len(layers)):
        if blocks_from is not None:
            store.copy_block(i, blocks_from, checkpoint_id)
        else:
            store.save_block(i, layers[i], checkpoint_id)
        linears.append(block_file_summary(store.block_path(i), linear_names))
    atomic_save(_resident_state(model, adapter), root / "resident.safetensors", {"format": FORMAT})
    config = model.config
    if hasattr(config, "quantization_config"):  # GGUF loads carry one; our weights are plain tensors
        del config.quantization_config
    config.save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    size = size_section(linears, _files_bytes(root))
    manifest = {"format": FORMAT, "checkpoint_id": checkpoint_id, "num_layers": len(layers), "size": size,
                "linears": [{name: {k: e[k] for k in ("kind", "shape", "bits", "groups", "scale_format") if k in e}
                             for name, e in layer.items()} for layer in linears],
                "code_digest": code_digest(), "git": versions()["git"], **info}
    # Last: its presence marks a complete save.
    atomic_write_text(root / "quant.json", json.dumps(manifest, indent=1))
    return size


def read_manifest(root: Path) -> dict:
    """quant.json of a complete checkpoint this version reads (CheckpointError otherwise)."""
    if not root.is_dir():
        raise CheckpointError(f"no such directory{interrupted_hint(root)}")
    if not (root / "quant.json").is_file():
        raise CheckpointError("not a complete --save_quantized directory (no quant.json)")
    try:
        info = json.loads((root / "quant.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"quant.json is not valid JSON ({first_line(exc)})") from None
    if not isinstance(info, dict) or info.get("format") not in READABLE:
        fmt = info.get("format") if isinstance(info, dict) else None
        raise CheckpointError(f"unknown checkpoint format {fmt!r} (this version reads {', '.join(READABLE)}); "
                              "use the version that wrote it")
    if not info.get("checkpoint_id"):
        raise CheckpointError("saved by an older version that recorded no checkpoint id for its block files, "
                              "so a swapped or foreign block would go unnoticed")
    return info


def _check_resident(model, adapter, resident: dict[str, torch.Tensor]) -> None:
    check_tensors(_resident_state(model, adapter), resident, "resident.safetensors")


def _check_linears(block: QuantBlock, listed: dict, index: int) -> None:
    """quant.json's per-linear shapes and bits agree with what the block file held."""
    for name, entry in listed.items():
        weight = block.layer.get_submodule(name).weight
        codes = block.weight_codes.get(name, {})
        if codes:
            bits = len(codes["planes"]) if codes.get("kind") == "binary" else codes.get("bits")
        else:  # a float linear: once loaded its width is the run's dtype (load_block casts), not the file's
            bits = entry.get("bits") if entry.get("kind") == "float" else "float"
        if list(weight.shape) != entry.get("shape") or bits != entry.get("bits"):
            raise CheckpointError(f"block {index} {name}: quant.json lists {entry.get('shape')} at "
                                  f"{entry.get('bits')} bits, the block file holds {list(weight.shape)} at {bits}")


def load_quantized(directory: str | os.PathLike, device: torch.device, dtype: torch.dtype | None = None):
    """Returns (model, tokenizer, adapter, info) from a :func:`save_quantized` directory.

    Every model tensor comes in ``dtype`` (default: the run's dtype on ``device``), whatever
    the checkpoint was saved in: resident tensors and blocks alike, never a mix.

    A missing, corrupt or mismatched directory is a one-line UserError naming it; nothing
    is evaluated or written before every file has been read and checked.
    """
    root = Path(directory)
    with user_errors(root):
        return _load_quantized(root, device, dtype)


@contextmanager
def user_errors(root: Path) -> Iterator[None]:
    """A CheckpointError becomes the one-line UserError that names the directory and the fix."""
    try:
        yield
    except CheckpointError as exc:
        raise UserError(f"--load_quantized {root}: {exc}; re-create it with --save_quantized") from None


def _load_quantized(root: Path, device: torch.device, dtype: torch.dtype | None):
    # Lazy on purpose: transformers takes ~1.1 s to import (python -X importtime on the 2-core dev
    # machine), and a run whose checks fail before any model is loaded should not pay it.
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = read_manifest(root)
    current = code_digest()
    if info.get("code_digest") != current:  # a warning: refusing would block every reload after any code change
        print(f"warning: {root} was saved by other quantization code (code digest {info.get('code_digest')}, git "
              f"{info.get('git')}; now {current}): loading is exact, but its numbers are that code's")
    try:
        config = AutoConfig.from_pretrained(str(root))
        adapter = adapter_for(config)
    except Exception as exc:  # missing/corrupt config.json, an architecture we do not know
        raise CheckpointError(f"config.json: {first_line(exc)}") from None
    dtype = dtype or default_dtype(device)
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
        layers[i] = store.load_block(i, adapter.make_block(layers[i], spec), device, info["checkpoint_id"])
        _check_linears(layers[i], listed[i] if i < len(listed) else {}, i)
        check_stored_quantizers(layers[i], info.get("bit_manifest") or {}, i)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:
        raise CheckpointError(f"tokenizer: {first_line(exc)}") from None
    return model.to(device).eval(), tokenizer, adapter, info
