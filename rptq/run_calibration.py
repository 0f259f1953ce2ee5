"""A run's calibration step: its windows, the fingerprint resume checks, out-of-core streaming around
:func:`rptq.pipeline.quantize_model`, and GPTQ's failure as a one-line error."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from common.errors import UserError
from eval.data import calibration_windows, check_dataset_name
from models.execution import capture_block_inputs
from models.streaming import layer_loader, load_resident, release_resident, return_freed_memory

from .layer_store import LayerStore
from .pipeline import CalibrationReport, quantize_model
from .run_config import RunConfig
from .run_report import plot_layer_set


def fingerprint(cfg: RunConfig, model, windows, seqlen: int) -> str:
    """Identifies everything a calibration result depends on (resume refuses any other)."""
    ident = {"model": cfg.model, "config": model.config.to_dict(), "quant": dataclasses.asdict(cfg.quant),
             "seqlen": seqlen, "dtype": str(next(model.parameters()).dtype),
             "windows": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def calibrate(cfg: RunConfig, model, tokenizer, adapter, reader, device, seqlen: int, store: LayerStore | None,
              placement) -> CalibrationReport:
    """Calibrate in place; ``reader`` set: out of core, the layers stream from the checkpoint."""
    check_dataset_name(cfg.calib_dataset, "calibration")
    windows = calibration_windows(tokenizer, cfg.calib_dataset, cfg.nsamples, seqlen, cfg.quant.seed,
                                  cfg.cache_dir)
    source = captured = trim = None
    run_id = fingerprint(cfg, model, windows, seqlen)
    if reader is not None:  # out of core: only decoder layers are needed while calibrating
        dtype = next(model.parameters()).dtype
        source = layer_loader(model, adapter, reader, dtype)
        captured = capture_block_inputs(model, adapter.layers(model), windows, device)
        release_resident(model, adapter)
        trim = lambda _layer: return_freed_memory()  # noqa: E731
    try:
        plot_layers = plot_layer_set(cfg.plot_layers, len(adapter.layers(model))) if cfg.act_dist_plot else set()
        report = quantize_model(model, adapter, windows, cfg.quant, device, progress=cfg.progress, store=store,
                                fingerprint=run_id, layer_source=source, offload=reader is not None,
                                placement=placement, captured=captured, on_layer_done=trim, plot_layers=plot_layers)
    except torch.linalg.LinAlgError as exc:  # finished layers stay in the resume state
        raise UserError(f"GPTQ could not factorise a layer's input Hessian ({str(exc).splitlines()[0]}); "
                        "raise --percdamp or calibrate on more --nsamples") from None
    if reader is not None:
        load_resident(model, adapter, reader, dtype, device)
    return report
