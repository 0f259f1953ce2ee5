"""One run, top to bottom: check, load, calibrate, save, evaluate, report. ``main.py`` builds the RunConfig."""
from __future__ import annotations

import shutil
from pathlib import Path

from common.errors import UserError
from common.atomic import write_errors
from eval.report import format_summary
from models.loading import load_config, pick_device
from models.placement import dispatch
from models.registry import adapter_for

from .auto_offload import auto_offload, needs_calibration
from .checkpoint import load_quantized, save_quantized
from .checkpoint_info import loaded_from, saved_run_config, source_digest
from .evaluate import evaluate, perplexities, tasks_bos
from .export import describe_export, export_compressed_tensors
from .layer_store import LayerStore
from .load import load, shard
from .methods import bit_manifest
from .packed_weights import describe_size
from .results import assemble_results, write_results
from .run_calibration import CalibrationInterrupted, calibrate
from .run_config import RunConfig
from .run_report import annotate_transforms
from .validate import check_calibration_data, check_model, check_texts, validate


def run(cfg: RunConfig, given: frozenset[str] = frozenset()) -> dict:
    """``given``: the flags set on the command line (main.py), checked against a --load_quantized checkpoint."""
    validate(cfg, given)
    config = None if cfg.load_quantized else load_config(cfg.model, cfg.cache_dir)  # config.json, no weights
    if config is not None:  # GGUF (None): checked right after its load instead
        check_model(cfg, config, adapter_for(config))
    device = pick_device("cuda" if cfg.multigpu else cfg.device)
    cfg, auto = auto_offload(cfg, device)
    try:
        check_calibration_data(cfg)  # still before the load; after the fit, whose advice comes first
        results = _run(cfg, device, auto)
    except BaseException as exc:
        if auto and not cfg.output_path:  # a temporary directory nobody could resume from
            shutil.rmtree(cfg.offload_dir, ignore_errors=True)
            if isinstance(exc, CalibrationInterrupted):
                exc.discard("the temporary out-of-core directory was removed; --output_path keeps one")
        raise
    if auto:  # like calibration_state: kept only for an interrupted run to resume from
        shutil.rmtree(cfg.offload_dir, ignore_errors=True)
    return results


def _run(cfg: RunConfig, device, auto_offloaded: bool) -> dict:
    loaded = None
    if cfg.load_quantized:
        model, tokenizer, adapter, info = load_quantized(cfg.load_quantized, device)
        cfg = saved_run_config(cfg, info, adapter.block_spec(model.config))  # the checkpoint labels the run
        loaded = loaded_from(cfg, info)
        reader, manifest = None, info["bit_manifest"]
    else:
        model, tokenizer, adapter, reader = load(cfg, device)
        manifest = bit_manifest(cfg.quant, adapter.block_spec(model.config))
    if cfg.export_dir and reader is not None:
        raise UserError("--export needs the quantized model in memory and this one is calibrated out of core; "
                        "--save_quantized here and export from --load_quantized where the model fits")
    check_model(cfg, model.config, adapter, adapter.layers(model)[0])
    seqlen, why = cfg.seqlen_for(adapter.max_positions(model.config))
    print(why)
    check_texts(cfg, tokenizer, seqlen)  # file: texts hold a window: before calibration, not after it
    placement, mapping = None, None
    if cfg.multigpu:
        placement, mapping = shard(model, adapter, cfg.nsamples, seqlen)

    store, report = None, None
    base_ppl = {}
    if cfg.eval_base_ppl:  # before calibration changes the model in place
        base_ppl = perplexities(cfg, model, tokenizer, adapter, None, None, device, seqlen, cfg.eval_limit,
                                wanted=True)
    if cfg.offload_dir:
        store = LayerStore(cfg.offload_dir)
    elif cfg.output_path and cfg.resume:
        store = LayerStore(Path(cfg.output_path) / "calibration_state")
    if not cfg.load_quantized and needs_calibration(manifest):
        report = calibrate(cfg, model, tokenizer, adapter, reader, device, seqlen, store, placement)
    elif reader is not None:
        raise UserError("--offload_dir streams the layers a quantized run calibrates; for full precision load "
                        "the model normally (drop --offload_dir)")
    if report is not None and report.decisions():  # where each point's transforms went (layer 0 as the example)
        manifest = annotate_transforms(manifest, report.decisions()[0]["placements"])
    if mapping is not None:  # hooks on the new blocks, so evaluation inputs follow the layers
        dispatch(model, mapping)
    export = None
    if cfg.export_dir:  # before --save_quantized: a refusal leaves nothing written
        export = export_compressed_tensors(cfg.export_dir, model, adapter, tokenizer)
        print("\n".join(describe_export(export)))
    checkpoint = None
    if cfg.save_quantized:
        with write_errors(cfg.save_quantized, "--save_quantized"):
            size = save_quantized(cfg.save_quantized, model, adapter, tokenizer,
                                  {"model": cfg.model, "model_digest": source_digest(cfg), "bit_manifest": manifest,
                                   "config": cfg.flat()},
                                  blocks_from=store if reader is not None else None)
        checkpoint = {"path": str(cfg.save_quantized), **size}
        print(f"checkpoint {cfg.save_quantized}: {describe_size(size)}")

    evaluation = evaluate(cfg, model, tokenizer, adapter, reader, store, device, seqlen)
    results = assemble_results(cfg, seqlen, manifest, evaluation, base_ppl, report,
                               tasks_bos(cfg, model, tokenizer), checkpoint, auto_offloaded, loaded, export)
    print(format_summary(results), flush=True)  # first: a write that fails must not lose the numbers
    if cfg.output_path:
        write_results(cfg, results, report)
    if store is not None and not cfg.offload_dir:  # resume state is only for interrupted runs
        shutil.rmtree(store.root, ignore_errors=True)
    return results
