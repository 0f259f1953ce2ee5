"""A directory of per-layer block files, and the marker that lets calibration resume.

Three users share it: out-of-core calibration (blocks live here, not in memory), resumable
calibration (after each layer: its block, then the next layer's inputs, then state.json),
and a ``--save_quantized`` directory (rptq/checkpoint.py), which is the same block files
plus the rest of the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common.atomic import atomic_write_text, write_errors
from models.block import QuantBlock

from .block_file import load_block, restamp_block, save_block
from .tensor_file import atomic_save, read_tensors


_WHERE = "--output_path (its calibration_state), --offload_dir or --save_quantized"


def _identity(index: int, checkpoint: str | None) -> dict:
    return {"layer": index, **({"checkpoint": checkpoint} if checkpoint else {})}


class LayerStore:
    """A directory of block files ``block-00003.safetensors`` and the resume state."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def block_path(self, index: int) -> Path:
        return self.root / f"block-{index:05d}.safetensors"

    def save_block(self, index: int, block: QuantBlock, checkpoint: str | None = None) -> None:
        """``checkpoint``: the id of the --save_quantized directory it belongs to (recorded with its index)."""
        with write_errors(self.root, _WHERE):
            save_block(block, self.block_path(index), _identity(index, checkpoint))

    def load_block(self, index: int, block: QuantBlock, device="cpu", checkpoint: str | None = None) -> QuantBlock:
        """With ``checkpoint``: the file must record this index and id (not swapped or copied in)."""
        return load_block(block, self.block_path(index), device, _identity(index, checkpoint) if checkpoint else None)

    def copy_block(self, index: int, source: "LayerStore", checkpoint: str) -> None:
        """Another store's block file, stamped as this checkpoint's (out-of-core runs save this way)."""
        with write_errors(self.root, _WHERE):
            restamp_block(source.block_path(index), self.block_path(index), _identity(index, checkpoint))

    # -- resumable calibration ------------------------------------------------------------
    # state.json: {"fingerprint": what the layers depend on (rptq/run_calibration.py), "next_layer",
    # "layers": each finished layer's record (its layer_errors / decisions entries and timing, so a
    # resumed run's results.json lists every layer), "calibration_s": seconds of every attempt so far}.
    def inputs_path(self, next_layer: int) -> Path:
        # Named by layer: a state.json pointing at layer i never reads layer i+1's inputs, even when an
        # interrupt falls between writing the inputs and writing the marker.
        return self.root / f"inputs-{next_layer:05d}.safetensors"

    def save_progress(self, next_layer: int, inputs: torch.Tensor, fingerprint, layers: list[dict] | None = None,
                      calibration_s: float = 0.0) -> None:
        """Written after a layer's block file: the inputs of the next layer, then the marker."""
        with write_errors(self.root, _WHERE):  # a full disk: the state so far stays whole and resumable
            atomic_save({"inputs": inputs}, self.inputs_path(next_layer))
            atomic_write_text(self.root / "state.json", json.dumps(
                {"fingerprint": fingerprint, "next_layer": next_layer, "layers": layers or [],
                 "calibration_s": calibration_s}))
        self._drop_inputs(keep=next_layer)

    def progress(self) -> dict | None:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def load_inputs(self, next_layer: int, device="cpu") -> torch.Tensor:
        return read_tensors(self.inputs_path(next_layer), device)[0]["inputs"]

    def _drop_inputs(self, keep: int | None = None) -> None:
        for path in self.root.glob("inputs*.safetensors"):
            if keep is None or path != self.inputs_path(keep):
                path.unlink(missing_ok=True)

    def finish(self) -> None:
        """Calibration complete: the activations are no longer needed; keep the blocks."""
        self._drop_inputs()
        state = self.progress() or {}
        state["complete"] = True
        atomic_write_text(self.root / "state.json", json.dumps(state))
