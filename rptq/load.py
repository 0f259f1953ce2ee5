"""The model a run works on: loaded in memory, as an out-of-core skeleton, or sharded over GPUs."""
from __future__ import annotations

import torch

from models.loading import default_dtype, load_model, local_model_dir
from models.placement import describe, device_map, dispatch, module_bytes, plan_layers, visible_cuda_budgets
from models.registry import adapter_for
from models.streaming import load_skeleton, prefer_mmap_for_large_buffers

from .run_config import RunConfig


def load(cfg: RunConfig, device):
    """(model, tokenizer, adapter, reader): reader is set for out-of-core models."""
    if cfg.offload_dir:
        # Lazy on purpose: transformers takes ~1.1 s to import (python -X importtime on the 2-core dev
        # machine), and a run whose checks fail before any model is loaded should not pay it.
        from transformers import AutoConfig, AutoTokenizer

        prefer_mmap_for_large_buffers()  # out of core, memory must not creep with depth
        model_dir = local_model_dir(cfg.model, cfg.cache_dir)
        adapter = adapter_for(AutoConfig.from_pretrained(model_dir))
        model, reader = load_skeleton(model_dir, adapter, default_dtype(device), device)
        return model, AutoTokenizer.from_pretrained(model_dir), adapter, reader
    if cfg.multigpu:  # load in host memory at half precision; shard then places the layers
        return (*load_model(cfg.model, torch.device("cpu"), cfg.cache_dir, dtype=torch.float16), None)
    return (*load_model(cfg.model, device, cfg.cache_dir), None)


def shard(model, adapter, nsamples: int, seqlen: int):
    """Plan and apply the layer placement over all visible GPUs; returns (per-layer devices, device map)."""
    layers = adapter.layers(model)
    itemsize = next(model.parameters()).element_size()
    hidden = model.config.hidden_size
    # Each device holds the calibration activations (inputs and outputs) while its layers run.
    reserve = 2 * nsamples * seqlen * hidden * itemsize + 4 * model.config.num_attention_heads * seqlen * seqlen
    devices, budgets = visible_cuda_budgets(reserve_bytes=reserve)
    layer_bytes = [module_bytes(layer) for layer in layers]
    plan = plan_layers(layer_bytes, budgets, module_bytes(model) - sum(layer_bytes))
    print(describe(plan, devices, layer_bytes))
    mapping = device_map(model, adapter.layers_path, plan, devices)
    dispatch(model, mapping)
    return [devices[p] for p in plan], mapping
