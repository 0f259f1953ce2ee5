"""RPTQ over a whole model: capture decoder inputs, then calibrate block after block."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from common.errors import UserError
from models.execution import capture_block_inputs, layer_kwargs_on

from . import methods
from .block_report import BlockReport
from .calibrate import calibrate_block
from .config import QuantConfig
from .context import ModelContext
from .layer_store import LayerStore
from .tensor_file import CheckpointError


def layer_record(layer: int, block: BlockReport) -> dict:
    """What results.json keeps of one calibrated layer (its ``layer_errors`` and ``decisions`` entries)
    and its timing; JSON, so a resumed run reloads the layers an earlier attempt finished."""
    return {"errors": {"layer": layer, **block.errors},
            "decision": {"layer": layer, "groups": {p: len(g) for p, g in block.layouts.items()},
                         "points": block.decisions, "placements": block.placements},
            "timing": dataclasses.asdict(block.timing)}


@dataclass
class CalibrationReport:
    layers: list[BlockReport] = field(default_factory=list)
    capture_s: float = 0.0
    total_s: float = 0.0  # this attempt

    first_layer: int = 0  # layers before it were finished by an earlier (resumed) run
    earlier: list[dict] = field(default_factory=list)  # their :func:`layer_record`s, from the resume state
    earlier_s: float = 0.0  # calibration seconds of the earlier attempts, up to their last finished layer
    resumed_from: int | None = None  # first_layer when this run resumed a state, else None
    plot_data: dict = field(default_factory=dict)  # layer -> point -> channel ranges before/after
    model_steps: dict = field(default_factory=dict)  # what the model steps reported (R1, SpinQuant's learning)

    @property
    def seconds(self) -> float:
        """Calibration time over every attempt."""
        return self.earlier_s + self.total_s

    def records(self) -> list[dict]:
        """Every layer's :func:`layer_record`: the earlier attempts' ones, then this run's."""
        return self.earlier + [layer_record(self.first_layer + i, t) for i, t in enumerate(self.layers)]

    def summary(self) -> dict:
        records = self.records()
        sums = {k: sum(r["timing"][k] for r in records) for k in ("stats_s", "transform_s", "weights_s", "output_s")}
        return {"capture_s": self.capture_s, "total_s": self.seconds, **sums,
                "passes_per_layer": max((r["timing"]["passes"] for r in records), default=0),
                **self.model_steps}

    def layer_errors(self) -> list[dict]:
        """Per calibrated layer: the quantized block's output error against the FP block on the same
        inputs, each quantized point's activation error and each linear's weight-only error."""
        return [r["errors"] for r in self.records()]

    def decisions(self) -> list[dict]:
        """Per calibrated layer: what the method decided (clusters, FPTQ's strategies, where transforms went)."""
        return [r["decision"] for r in self.records()]


def run_model_steps(model: nn.Module, adapter, windows: torch.Tensor, cfg: QuantConfig, device: torch.device,
                    given: dict | None = None) -> ModelContext:
    """The run's model steps in their --transforms order (a step another one replaces is skipped: SpinQuant's
    learning performs residual_rotate's rotation itself)."""
    mctx = ModelContext(model, adapter, windows, cfg, device, given=dict(given or {}))
    replaced = {name for s in cfg.transforms for name in methods.step(s).replaces}
    for name in cfg.transforms:
        step = methods.step(name)
        if step.model is not None and name not in replaced:
            step.model(mctx)
    return mctx


def quantize_model(model: nn.Module, adapter, windows: torch.Tensor, cfg: QuantConfig,
                   device: torch.device | str = "cpu", progress: bool = True, store: LayerStore | None = None,
                   fingerprint: str | dict = "", layer_source=None, placement: list | None = None,
                   offload: bool = False, on_layer_done=None, captured: tuple | None = None,
                   plot_layers: set[int] | None = None, given: dict | None = None,
                   keep_codes: bool = True) -> CalibrationReport:
    """Replace every decoder layer of ``model`` by its reordered, quantized block, in place.

    store:        a :class:`LayerStore`; each finished block, the next layer's inputs and the
                  finished layers' records are written there, and a run with the same
                  ``fingerprint`` (any JSON value) resumes after the last finished layer, its
                  report holding every layer (a different fingerprint is refused).
    layer_source: ``fn(i) -> layer`` materialising layer i (out-of-core: from the checkpoint).
    placement:    the device of each layer (sharding); inputs follow the layers.
    offload:      release each block after writing it (its weights stay only in ``store``).
    captured:     (inputs, layer kwargs) of layer 0 from :func:`capture_block_inputs`, when the
                  caller captured them already (out of core: to drop the embeddings meanwhile).
    plot_layers:  layers whose per-channel ranges before/after the transforms are kept (report.plot_data).
    given:        inputs for the model steps (e.g. SpinQuant's rotations, learned already).
    keep_codes:   keep each quantized weight's integer codes (a packed checkpoint or an export needs them).
    """
    device = torch.device(device)
    start = time.perf_counter()
    spec = adapter.block_spec(model.config)
    layers = adapter.layers(model)
    report = CalibrationReport()
    whole = [s for s in cfg.transforms if methods.step(s).whole_model]
    if whole and (layer_source is not None or captured is not None):
        raise UserError(f"{whole[0]} changes the embeddings and every layer at once and needs the model in memory; "
                        f"drop --offload_dir (or raise --max_memory), or drop {whole[0]}")
    mctx = run_model_steps(model, adapter, windows, cfg, device, given)  # before layer 0's inputs are captured
    report.model_steps = mctx.report
    inputs, layer_kwargs = captured or capture_block_inputs(model, layers, windows, device)
    report.capture_s = time.perf_counter() - start
    first = 0
    state = store.progress() if store is not None else None
    if state is not None:
        if state["fingerprint"] != fingerprint:
            raise UserError(f"the calibration state in {store.root} was written by a different model, data, seed "
                            "or quantization settings; delete that directory or choose another one")
        first = state["next_layer"]
        report.first_layer = report.resumed_from = first
        report.earlier, report.earlier_s = state.get("layers", []), state.get("calibration_s", 0.0)
        if len(report.earlier) != first:  # a state written before the layers' records were kept
            raise UserError(f"the calibration state in {store.root} lacks the reports of its finished layers; "
                            "delete that directory to calibrate from the start")
        if first < len(layers):
            try:
                inputs = store.load_inputs(first, device)
            except CheckpointError as exc:
                raise UserError(f"the calibration state in {store.root} cannot be read ({exc}); delete that "
                                "directory to calibrate from the start") from None
    for i in tqdm(range(len(layers)), desc="calibrating layers", disable=not progress):
        layer_device = torch.device(placement[i]) if placement else device
        layer = layers[i] if layer_source is None or i < first else layer_source(i)
        block = adapter.make_block(layer, spec)
        if i < first:  # finished in an earlier run
            if not offload:
                try:
                    layers[i] = store.load_block(i, block, layer_device)
                except CheckpointError as exc:
                    raise UserError(f"the calibration state in {store.root} cannot be read ({exc}); delete that "
                                    "directory to calibrate from the start") from None
            continue
        block = block.to(layer_device)
        inputs, block_report = calibrate_block(block, inputs.to(layer_device),
                                               layer_kwargs_on(adapter.layer_kwargs(model, i, layer_kwargs),
                                                               layer_device), cfg, layer=i,
                                               keep_ranges=bool(plot_layers) and i in plot_layers,
                                               given={k: v[i] for k, v in mctx.per_layer.items()},
                                               side_by_side=not offload,  # out of core, memory binds
                                               keep_codes=keep_codes)
        report.layers.append(block_report)
        if block_report.ranges:
            report.plot_data[i] = block_report.ranges
        if store is not None:
            store.save_block(i, block)
            store.save_progress(i + 1, inputs, fingerprint, report.records(),
                                report.earlier_s + time.perf_counter() - start)
        # Out of core the layer goes back to an empty skeleton: its block lives in ``store`` only.
        layers[i] = block.layer.to("meta") if offload else block
        if on_layer_done is not None:
            on_layer_done(i)
    if store is not None:
        store.finish()
    report.total_s = time.perf_counter() - start
    return report
