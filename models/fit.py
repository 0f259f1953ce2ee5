"""Does a model fit? Decides, before any weight is read, whether calibration runs in
memory or out of core (one decoder layer at a time, ``--offload_dir``).

The estimate comes from the config alone: an empty (meta) skeleton gives the exact
parameter bytes at the load dtype; the per-layer working set of calibration is the
GPTQ Hessians (one n x n fp32 matrix per distinct linear input) plus the calibration
activations going in and out of the layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .placement import GIB

HEADROOM = 0.9  # leave a tenth of what is free to the allocator, the interpreter and the OS


@dataclass(frozen=True)
class MemoryNeed:
    weights: int  # bytes of the whole model at the load dtype
    layer: int  # bytes of the largest decoder layer
    working: int  # bytes calibration needs beside the weights, per layer

    @property
    def in_memory(self) -> int:
        return self.weights + self.working

    @property
    def out_of_core(self) -> int:
        return self.layer + self.working


def estimate_need(config, adapter, dtype: torch.dtype, nsamples: int, seqlen: int) -> MemoryNeed:
    """Bytes needed to calibrate a model of ``config`` (nothing is allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # a meta skeleton is not tied on construction; a tied head is not stored twice
    itemsize = dtype.itemsize
    weights = sum(p.numel() for p in model.parameters()) * itemsize  # tied weights count once
    layers = adapter.layers(model)
    layer = max(sum(p.numel() for p in lay.parameters()) * itemsize for lay in layers)
    spec = adapter.block_spec(config)
    columns = {point: layers[0].get_submodule(name).in_features for name, point in spec.linear_inputs.items()}
    hessians = sum(n * n * 4 for n in columns.values())
    activations = 2 * nsamples * seqlen * spec.hidden_size * itemsize
    return MemoryNeed(weights=weights, layer=layer, working=hessians + activations + layer)  # + a fused copy


def available_bytes(device: torch.device) -> int:
    """Memory free for this run now: host RAM on CPU; on CUDA the smaller of the GPU's free
    memory and host RAM (weights pass through the host while loading)."""
    host = _host_available()
    if device.type == "cuda":
        return min(torch.cuda.mem_get_info(device)[0], host)
    return host


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_in_memory(need: MemoryNeed, available: int) -> bool:
    return need.in_memory <= HEADROOM * available


def describe_need(need: MemoryNeed, available: int, dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return (f"calibrating in memory needs {need.in_memory / GIB:.1f} GiB ({need.weights / GIB:.1f} GiB of {name} "
            f"weights), {available / GIB:.1f} GiB available; out of core needs {need.out_of_core / GIB:.2f} GiB")
