"""Quantized blocks on disk: one safetensors file per block, plus the rest of the model.

A block file holds everything its forward needs: the fused, fake-quantized layer
weights, the norm gathers, each activation quantizer's spec and parameters, and any
architecture buffers (Llama's rotary-table gathers). The same files serve three
uses: ``--save_quantized`` / ``--load_quantized``, resumable calibration, and
out-of-core calibration (blocks leave memory once written).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eval.atomic import atomic_write, atomic_write_text
from models.block import QuantBlock
from quant.quantizer import ActQuantizer, QuantSpec
from rptq.transforms import transform_from_state

FORMAT = "rptq-block-v2"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata={k: json.dumps(v) for k, v in (metadata or {}).items()}))


def read_tensors(path: Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        return {name: handle.get_tensor(name) for name in handle.keys()}, meta


def save_block(block: QuantBlock, path: Path) -> None:
    tensors = {f"layer.{k}": v for k, v in block.layer.state_dict().items()}
    tensors.update({f"gather.{p}": perm for p, perm in block.gathers.items() if perm is not None})
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
    atomic_save(tensors, path, {"format": FORMAT, "taps": taps, "online": online})


def load_block(block: QuantBlock, path: Path, device="cpu") -> QuantBlock:
    """Fill a freshly made block (its layer may be an empty skeleton) from ``path``."""
    tensors, meta = read_tensors(path, device)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an RPTQ block file")
    layer_state = {k[len("layer."):]: v for k, v in tensors.items() if k.startswith("layer.")}
    block.layer.load_state_dict(layer_state, assign=True, strict=True)
    for point in block.gathers:
        block.gathers[point] = tensors.get(f"gather.{point}")
    for name, value in tensors.items():
        if name.startswith("buffer."):
            setattr(block, name[len("buffer."):], value)
    for point, spec in meta["taps"].items():
        groups = tuple(spec["group_sizes"]) if spec["group_sizes"] is not None else None
        qspec = QuantSpec(spec["bits"], groups, spec["dynamic"], spec["grid"], spec["clip"], spec["unit_grid"])
        block.taps[point] = ActQuantizer.from_params(qspec, tensors.get(f"tap.{point}.scale"),
                                                     tensors.get(f"tap.{point}.zero"))
    for point, kinds in meta.get("online", {}).items():
        for i, kind in enumerate(kinds):
            prefix = f"online.{point}.{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            block.online[point].steps.append(transform_from_state(kind, state))
    return block.to(device)


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


def save_quantized(out_dir: str | os.PathLike, model, adapter, tokenizer, info: dict,
                   blocks_from: LayerStore | None = None) -> None:
    """Fused, quantized model: block files + resident tensors + config/tokenizer + quant.json.

    ``blocks_from``: copy block files from this store (out-of-core runs) instead of the model.
    """
    import shutil

    store = LayerStore(out_dir)
    layers = adapter.layers(model)
    for i in range(len(layers)):
        if blocks_from is not None:
            store.root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(blocks_from.block_path(i), store.block_path(i))
        else:
            store.save_block(i, layers[i])
    atomic_save(_resident_state(model, adapter), store.root / "resident.safetensors", {"format": FORMAT})
    config = model.config
    if hasattr(config, "quantization_config"):  # GGUF loads carry one; our weights are plain tensors
        del config.quantization_config
    config.save_pretrained(str(store.root))
    tokenizer.save_pretrained(str(store.root))
    # Last: its presence marks a complete save.
    atomic_write_text(store.root / "quant.json", json.dumps({"format": FORMAT, "num_layers": len(layers), **info},
                                                           indent=2))


def load_quantized(directory: str | os.PathLike, device: torch.device):
    """Returns (model, tokenizer, adapter, info) from a :func:`save_quantized` directory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.loading import default_dtype
    from models.registry import adapter_for
    from rptq.errors import UserError

    root = Path(directory)
    if not (root / "quant.json").is_file():
        raise UserError(f"{root} is not a complete --save_quantized directory (no quant.json)")
    info = json.loads((root / "quant.json").read_text())
    config = AutoConfig.from_pretrained(str(root))
    dtype = default_dtype(device)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(config)
    resident, _ = read_tensors(root / "resident.safetensors")
    model.load_state_dict({k: v.to(dtype) for k, v in resident.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    spec = adapter.block_spec(config)
    layers = adapter.layers(model)
    store = LayerStore(root)
    for i in range(len(layers)):
        layers[i] = store.load_block(i, adapter.make_block(layers[i], spec), device)
    tokenizer = AutoTokenizer.from_pretrained(str(root))
    return model.to(device).eval(), tokenizer, adapter, info
