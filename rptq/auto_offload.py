"""Out-of-core calibration chosen for the user when the model would not fit in memory."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from common.errors import UserError
from models.fit import GIB, available_bytes, describe_need, estimate_need, fits_in_memory
from models.loading import default_dtype, load_config
from models.registry import adapter_for

from .config import FP
from .methods import bit_manifest
from .run_config import RunConfig


def needs_calibration(manifest: dict) -> bool:
    return any(entry["bits"] < FP for entry in manifest.values())


def auto_offload(cfg: RunConfig, device) -> tuple[RunConfig, bool]:
    """Switch to out-of-core calibration when the model does not fit; returns (config, switched)."""
    if cfg.offload_dir or cfg.multigpu or cfg.load_quantized:
        return cfg, False
    config = load_config(cfg.model, cfg.cache_dir)
    if config is None:  # GGUF: small, and not a safetensors checkpoint to stream from
        return cfg, False
    adapter = adapter_for(config)
    if not needs_calibration(bit_manifest(cfg.quant, adapter.block_spec(config))):
        return cfg, False
    dtype = default_dtype(device)
    need = estimate_need(config, adapter, dtype, cfg.nsamples, cfg.seqlen_for(adapter.max_positions(config))[0])
    available = int(cfg.max_memory_gib * GIB) if cfg.max_memory_gib else available_bytes(device)
    if fits_in_memory(need, available):
        return cfg, False
    if cfg.tasks:
        raise UserError(f"the model does not fit ({describe_need(need, available, dtype)}) and --tasks needs it in "
                        "memory; calibrate with --save_quantized here and run the tasks with --load_quantized "
                        "where it fits")
    root = Path(cfg.output_path) / "offload" if cfg.output_path else Path(tempfile.mkdtemp(prefix="rptq-offload-"))
    print(f"memory: {describe_need(need, available, dtype)}: calibrating out of core, layer blocks in {root} "
          "(choose the place with --offload_dir, the budget with --max_memory)")
    return dataclasses.replace(cfg, offload_dir=str(root)), True
