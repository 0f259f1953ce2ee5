"""A run's calibration step: its windows, the fingerprint resume checks, out-of-core streaming around
:func:`rptq.pipeline.quantize_model`, Ctrl-C as what was kept, and GPTQ's failure as a one-line error."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from common.errors import UserError
from common.provenance import code_digest
from eval.data import calibration_windows, check_dataset_name
from models.content import model_digest
from models.execution import capture_block_inputs
from models.streaming import layer_loader, load_resident, release_resident, return_freed_memory

from .evaluate import window_bos
from .layer_store import LayerStore
from .pipeline import CalibrationReport, quantize_model
from .run_config import RunConfig
from .run_report import plot_layer_set

# Test-only: after saving layer K's state, print a marker line and wait for a signal, so a test can
# interrupt a child process exactly at a layer boundary (tests/test_faults_resume.py).
PAUSE_ENV = "RPTQ_TEST_PAUSE_AFTER_LAYER"


class CalibrationInterrupted(KeyboardInterrupt):
    """Ctrl-C during calibration, saying how far it got and whether a rerun resumes (main.py prints it)."""

    def __init__(self, done: int, total: int, state_dir: Path | None, reason: str = ""):
        super().__init__(done, total, state_dir, reason)
        self.done, self.total, self.state_dir, self.reason = done, total, state_dir, reason

    def discard(self, reason: str) -> None:
        """The state was removed after all (a temporary out-of-core directory)."""
        self.state_dir, self.reason = None, reason

    def __str__(self) -> str:
        if self.state_dir is None:
            return (f"interrupted after {self.done} of {self.total} layers were calibrated; nothing was kept "
                    f"({self.reason}), so a rerun calibrates from the start")
        if self.done == 0:
            return f"interrupted before the first of {self.total} layers was calibrated; rerun the same command"
        return (f"interrupted after {self.done} of {self.total} layers were calibrated (kept in {self.state_dir}); "
                "rerun the same command to resume")


def fingerprint(cfg: RunConfig, model, windows, seqlen: int) -> dict:
    """What a calibration result depends on, in parts that resume compares one by one: the model's files
    by content (weights, config, tokenizer), the quantization code, the settings, the calibration windows."""
    settings = {**cfg.quant.flat(), "seqlen": seqlen, "keeps_codes": keeps_codes(cfg),
                "dtype": str(next(model.parameters()).dtype),
                "nsamples": cfg.nsamples, "calib_dataset": cfg.calib_dataset}
    ident = {"model": model_digest(cfg.model, cfg.cache_dir)["files"], "code": code_digest(), "settings": settings,
             "windows": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()}
    return json.loads(json.dumps(ident, sort_keys=True, default=str))  # as state.json will hold it


def keeps_codes(cfg: RunConfig) -> bool:
    """Whether the run keeps the weights' integer codes: only a packed checkpoint or an export reads them."""
    return bool(cfg.save_quantized or cfg.export_dir)


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def differences(old, new: dict) -> list[str]:
    """Which parts of two fingerprints differ, in words."""
    if not isinstance(old, dict) or set(old) != set(new):
        return ["fingerprint formats (an older version of this toolkit wrote the state)"]
    out = []
    if old["model"] != new["model"]:
        files = _changed(old["model"], new["model"])
        out.append(f"model weights/tokenizer files ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''})")
    if old["code"] != new["code"]:
        out.append("quantization code (quant/, models/, rptq/, eval/ppl.py or eval/data.py changed since)")
    if old["settings"] != new["settings"]:
        out.append(f"settings ({', '.join(_changed(old['settings'], new['settings']))})")
    if old["windows"] != new["windows"]:
        out.append("calibration windows (the calibration text, tokenizer, --nsamples, --seqlen or --seed)")
    return out


def check_resume(cfg: RunConfig, store: LayerStore, ident: dict) -> None:
    """Refuse a resume state made from anything else, naming what differs and the way out."""
    state = store.progress()
    if state is None or state.get("fingerprint") == ident:
        return
    if cfg.output_path and store.root == Path(cfg.output_path) / "calibration_state":
        fix = f"delete {store.root} (or pass --no_resume) to calibrate from the start"
    else:
        fix = f"delete {store.root} to calibrate from the start, or choose another --offload_dir"
    raise UserError(f"the calibration state in {store.root} was written by a different model, data, seed or "
                    f"quantization settings; here the {' and the '.join(differences(state.get('fingerprint'), ident))} "
                    f"differ; {fix}")


def _on_layer_done(trim, finished: list[int]):
    """Counts finished layers into ``finished[0]``, runs ``trim`` (out of core) and the test-only pause
    of :data:`PAUSE_ENV`."""
    pause = os.environ.get(PAUSE_ENV)

    def done(i: int) -> None:
        finished[0] = i + 1
        if trim is not None:
            trim(i)
        if pause is not None and int(pause) == i:
            print(f"test: paused after layer {i}", flush=True)
            while True:  # until a signal ends it
                time.sleep(60)
    return done


def calibrate(cfg: RunConfig, model, tokenizer, adapter, reader, device, seqlen: int, store: LayerStore | None,
              placement) -> CalibrationReport:
    """Calibrate in place; ``reader`` set: out of core, the layers stream from the checkpoint."""
    check_dataset_name(cfg.calib_dataset, "calibration")
    windows = calibration_windows(tokenizer, cfg.calib_dataset, cfg.nsamples, seqlen, cfg.quant.seed,
                                  cfg.cache_dir, window_bos(adapter, tokenizer))
    source = captured = trim = None
    run_id = ""
    if store is not None:  # hashing the model's files only matters where a state is kept
        run_id = fingerprint(cfg, model, windows, seqlen)
        check_resume(cfg, store, run_id)
    total, finished = len(adapter.layers(model)), [0]
    if reader is not None:  # out of core: only decoder layers are needed while calibrating
        dtype = next(model.parameters()).dtype
        source = layer_loader(model, adapter, reader, dtype)
        captured = capture_block_inputs(model, adapter.layers(model), windows, device)
        release_resident(model, adapter)
        trim = lambda _layer: return_freed_memory()  # noqa: E731
    try:
        plot_layers = plot_layer_set(cfg.plot_layers, total) if cfg.act_dist_plot else set()
        report = quantize_model(model, adapter, windows, cfg.quant, device, progress=cfg.progress, store=store,
                                fingerprint=run_id, layer_source=source, offload=reader is not None,
                                placement=placement, captured=captured, plot_layers=plot_layers,
                                on_layer_done=_on_layer_done(trim, finished), keep_codes=keeps_codes(cfg))
    except torch.linalg.LinAlgError as exc:  # finished layers stay in the resume state
        raise UserError(f"GPTQ could not factorise a layer's input Hessian ({str(exc).splitlines()[0]}); "
                        "raise --percdamp or calibrate on more --nsamples") from None
    except KeyboardInterrupt:
        if store is not None:  # what the state says is what a rerun resumes from
            raise CalibrationInterrupted((store.progress() or {}).get("next_layer", 0), total, store.root) from None
        reason = "--no_resume" if cfg.output_path else "no --output_path to keep it in"
        raise CalibrationInterrupted(finished[0], total, None, reason) from None
    lost = sorted(i for i in plot_layers if i < report.first_layer)
    if lost:  # their channel ranges lived in the interrupted process only
        print(f"plots: layer(s) {', '.join(map(str, lost))} were calibrated before the interrupt and their ranges "
              "were not kept, so they are not drawn (a run from scratch draws them)")
    if reader is not None:
        load_resident(model, adapter, reader, dtype, device)
    return report
