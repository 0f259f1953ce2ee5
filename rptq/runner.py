"""One run: load, calibrate, evaluate, report. ``main.py`` builds the RunConfig."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import FP, QuantConfig
from .methods import bit_manifest
from common.errors import UserError
from .run_report import annotate_transforms, method_info, plot_layer_set, write_plot_data


@dataclass(frozen=True)
class RunConfig:
    model: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval_ppl: bool = False
    eval_base_ppl: bool = False
    ppl_datasets: tuple[str, ...] = ("wikitext2", "ptb", "c4")
    tasks: tuple[str, ...] = ()
    tasks_source: str = "auto"
    task_bos: str = "auto"
    num_fewshot: int = 0
    limit: int = -1
    nsamples: int = 128
    seqlen: int | None = None
    calib_dataset: str = "mix"
    cache_dir: str | None = None
    output_path: str | None = None
    device: str = "auto"
    offload_dir: str | None = None
    save_quantized: str | None = None
    load_quantized: str | None = None
    multigpu: bool = False
    max_memory_gib: float | None = None  # None: what the device has free when the run starts
    resume: bool = True
    progress: bool = True
    act_dist_plot: bool = False
    plot_layers: str = "0,mid,-1"

    def flat(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "quant"}
        out.update(dataclasses.asdict(self.quant))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _needs_calibration(manifest: dict) -> bool:
    return any(entry["bits"] < FP for entry in manifest.values())


def check_dir_arg(flag: str, value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a directory")
    return path


def fingerprint(cfg: RunConfig, model, windows, seqlen: int) -> str:
    """Identifies everything a calibration result depends on (resume refuses any other)."""
    import torch

    ident = {"model": cfg.model, "config": model.config.to_dict(), "quant": dataclasses.asdict(cfg.quant),
             "seqlen": seqlen, "dtype": str(next(model.parameters()).dtype),
             "windows": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _validate(cfg: RunConfig) -> None:
    """Everything checkable before a model is loaded: fail in seconds, not after calibration."""
    from eval.data import check_dataset_name

    for flag in ("output_path", "offload_dir", "save_quantized"):
        check_dir_arg(f"--{flag}", getattr(cfg, flag))
    if cfg.eval_ppl:
        for name in cfg.ppl_datasets:
            check_dataset_name(name, "ppl")
    if cfg.tasks:
        if cfg.offload_dir:
            raise UserError("--tasks needs the model in memory; with --offload_dir evaluate perplexity, or save with "
                            "--save_quantized and run the tasks with --load_quantized where the model fits")
        from eval.tasks import check_tasks

        check_tasks(list(cfg.tasks), cfg.num_fewshot, cfg.tasks_source)
    if cfg.multigpu:
        import torch

        if cfg.offload_dir or cfg.device == "cpu":
            raise UserError("--multigpu shards over GPUs; it cannot be combined with --offload_dir or --device cpu")
        if not torch.cuda.is_available():
            raise UserError("--multigpu needs visible CUDA devices; none found (check CUDA_VISIBLE_DEVICES)")
    if cfg.load_quantized and (cfg.offload_dir or cfg.save_quantized):
        raise UserError("--load_quantized evaluates a saved model; drop --offload_dir/--save_quantized")
    if cfg.eval_base_ppl and (cfg.offload_dir or cfg.load_quantized):
        raise UserError("--eval_base_ppl needs the unquantized model in memory; drop --offload_dir/--load_quantized "
                        "(or run the FP16 row separately with --wbits 16 --abits 16)")
    if cfg.act_dist_plot and not cfg.output_path:
        raise UserError("--act_dist_plot draws into OUTPUT_PATH/plots; pass --output_path DIR")


def _load(cfg: RunConfig, device):
    """(model, tokenizer, adapter, reader): reader is set for out-of-core models."""
    from models.loading import default_dtype, load_model, local_model_dir

    if cfg.offload_dir:
        from models.streaming import load_skeleton, prefer_mmap_for_large_buffers
        from models.registry import adapter_for
        from transformers import AutoConfig, AutoTokenizer

        prefer_mmap_for_large_buffers()  # out of core, memory must not creep with depth
        model_dir = local_model_dir(cfg.model, cfg.cache_dir)
        adapter = adapter_for(AutoConfig.from_pretrained(model_dir))
        model, reader = load_skeleton(model_dir, adapter, default_dtype(device), device)
        return model, AutoTokenizer.from_pretrained(model_dir), adapter, reader
    if cfg.multigpu:  # load in host memory at half precision; _shard then places the layers
        import torch

        return (*load_model(cfg.model, torch.device("cpu"), cfg.cache_dir, dtype=torch.float16), None)
    return (*load_model(cfg.model, device, cfg.cache_dir), None)


def _shard(model, adapter, nsamples: int, seqlen: int):
    """Plan and apply the layer placement over all visible GPUs; returns (per-layer devices, device map)."""
    from models.placement import describe, device_map, dispatch, module_bytes, plan_layers, visible_cuda_budgets

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


def _calibrate(cfg: RunConfig, model, tokenizer, adapter, reader, device, seqlen: int, store, placement):
    """Calibrate in place; returns (seconds, per-phase summary)."""
    from eval.data import calibration_windows, check_dataset_name

    from .pipeline import quantize_model

    check_dataset_name(cfg.calib_dataset, "calibration")
    windows = calibration_windows(tokenizer, cfg.calib_dataset, cfg.nsamples, seqlen, cfg.quant.seed,
                                  cfg.cache_dir)
    source = captured = trim = None
    run_id = fingerprint(cfg, model, windows, seqlen)
    if reader is not None:  # out of core: only decoder layers are needed while calibrating
        from models.streaming import layer_loader, release_resident, return_freed_memory

        from models.execution import capture_block_inputs

        dtype = next(model.parameters()).dtype
        source = layer_loader(model, adapter, reader, dtype)
        captured = capture_block_inputs(model, adapter.layers(model), windows, device)
        release_resident(model, adapter)
        trim = lambda _layer: return_freed_memory()  # noqa: E731
    import torch

    try:
        plot_layers = plot_layer_set(cfg.plot_layers, len(adapter.layers(model))) if cfg.act_dist_plot else set()
        report = quantize_model(model, adapter, windows, cfg.quant, device, progress=cfg.progress, store=store,
                                fingerprint=run_id, layer_source=source, offload=reader is not None,
                                placement=placement, captured=captured, on_layer_done=trim, plot_layers=plot_layers)
    except torch.linalg.LinAlgError as exc:  # finished layers stay in the resume state
        raise UserError(f"GPTQ could not factorise a layer's input Hessian ({str(exc).splitlines()[0]}); "
                        "raise --percdamp or calibrate on more --nsamples") from None
    if reader is not None:
        from models.streaming import load_resident

        load_resident(model, adapter, reader, dtype, device)
    return report.total_s, report.summary(), report


def _perplexities(cfg: RunConfig, model, tokenizer, adapter, reader, store, device, seqlen: int, limit,
                  wanted: bool | None = None) -> dict:
    from eval.data import eval_windows
    from eval.ppl import perplexity, streamed_perplexity

    ppl = {}
    for name in cfg.ppl_datasets if (cfg.eval_ppl if wanted is None else wanted) else ():
        windows = eval_windows(tokenizer, name, seqlen, cfg.cache_dir)
        if reader is not None:
            spec = adapter.block_spec(model.config)
            layers = adapter.layers(model)

            def block_at(i):
                return store.load_block(i, adapter.make_block(layers[i], spec), device)

            ppl[name] = streamed_perplexity(model, adapter, windows, block_at, device, limit=limit,
                                            progress=cfg.progress, desc=f"ppl {name}")
        else:
            ppl[name] = perplexity(model, windows, device, limit=limit, progress=cfg.progress, desc=f"ppl {name}")
    return ppl


def _tasks_bos(cfg: RunConfig, model, tokenizer) -> bool | None:
    if not cfg.tasks:
        return None
    from eval.tasks import effective_bos

    return effective_bos(model, tokenizer, cfg.task_bos)


def _auto_offload(cfg: RunConfig, device) -> tuple[RunConfig, bool]:
    """Switch to out-of-core calibration when the model does not fit; returns (config, switched)."""
    if cfg.offload_dir or cfg.multigpu or cfg.load_quantized:
        return cfg, False
    from models.fit import GIB, available_bytes, describe_need, estimate_need, fits_in_memory
    from models.loading import default_dtype, load_config
    from models.registry import adapter_for

    config = load_config(cfg.model, cfg.cache_dir)
    if config is None:  # GGUF: small, and not a safetensors checkpoint to stream from
        return cfg, False
    adapter = adapter_for(config)
    if not _needs_calibration(bit_manifest(cfg.quant, adapter.block_spec(config))):
        return cfg, False
    dtype = default_dtype(device)
    need = estimate_need(config, adapter, dtype, cfg.nsamples, cfg.seqlen or adapter.max_positions(config))
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


def run(cfg: RunConfig) -> dict:
    from models.loading import pick_device

    _validate(cfg)
    device = pick_device("cuda" if cfg.multigpu else cfg.device)
    cfg, auto = _auto_offload(cfg, device)
    try:
        results = _run(cfg, device, auto)
    except BaseException:
        if auto and not cfg.output_path:  # a temporary directory nobody could resume from
            shutil.rmtree(cfg.offload_dir, ignore_errors=True)
        raise
    if auto:  # like calibration_state: kept only for an interrupted run to resume from
        shutil.rmtree(cfg.offload_dir, ignore_errors=True)
    return results


def _run(cfg: RunConfig, device, auto_offload: bool) -> dict:
    from eval.report import format_summary, peak_rss_mb, versions, write_json_atomic

    from .checkpoint import load_quantized, save_quantized
    from .layer_store import LayerStore
    from .packed_weights import describe_size

    if cfg.load_quantized:
        model, tokenizer, adapter, info = load_quantized(cfg.load_quantized, device)
        reader, manifest = None, info["bit_manifest"]
    else:
        model, tokenizer, adapter, reader = _load(cfg, device)
        manifest = bit_manifest(cfg.quant, adapter.block_spec(model.config))
    max_pos = adapter.max_positions(model.config)
    seqlen = cfg.seqlen or max_pos
    if seqlen > max_pos:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions; use --seqlen {max_pos} or less")
    placement, mapping = None, None
    if cfg.multigpu:
        placement, mapping = _shard(model, adapter, cfg.nsamples, seqlen)

    calibration_s, calib_summary, store, report = 0.0, None, None, None
    base_ppl = {}
    if cfg.eval_base_ppl:  # before calibration changes the model in place
        base_ppl = _perplexities(cfg, model, tokenizer, adapter, None, None, device, seqlen,
                                 cfg.limit if cfg.limit > 0 else None, wanted=True)
    if cfg.offload_dir:
        store = LayerStore(cfg.offload_dir)
    elif cfg.output_path and cfg.resume:
        store = LayerStore(Path(cfg.output_path) / "calibration_state")
    if not cfg.load_quantized and _needs_calibration(manifest):
        calibration_s, calib_summary, report = _calibrate(cfg, model, tokenizer, adapter, reader, device, seqlen,
                                                          store, placement)
    elif reader is not None:
        raise UserError("--offload_dir streams the layers a quantized run calibrates; for full precision load "
                        "the model normally (drop --offload_dir)")
    if report is not None and report.layers:  # where each point's transforms went (layer 0 as the example)
        manifest = annotate_transforms(manifest, report.decisions()[0]["placements"])
    if mapping is not None:  # hooks on the new blocks, so evaluation inputs follow the layers
        from models.placement import dispatch

        dispatch(model, mapping)
    checkpoint = None
    if cfg.save_quantized:
        size = save_quantized(cfg.save_quantized, model, adapter, tokenizer,
                              {"model": cfg.model, "bit_manifest": manifest, "config": cfg.flat()},
                              blocks_from=store if reader is not None else None)
        checkpoint = {"path": str(cfg.save_quantized), **size}
        print(f"checkpoint {cfg.save_quantized}: {describe_size(size)}")

    start = time.perf_counter()
    limit = cfg.limit if cfg.limit > 0 else None
    ppl = _perplexities(cfg, model, tokenizer, adapter, reader, store, device, seqlen, limit)
    tasks = {}
    if cfg.tasks:
        from eval.tasks import evaluate_tasks

        tasks = evaluate_tasks(model, tokenizer, list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit,
                               source=cfg.tasks_source, device=str(device), seed=cfg.quant.seed,
                               cache_dir=cfg.cache_dir, bos=cfg.task_bos)
    eval_s = time.perf_counter() - start

    results = {
        "model": cfg.model,
        "config": {**cfg.flat(), "seqlen": seqlen},
        "method": method_info(cfg.quant),
        "bit_manifest": manifest,
        "ppl": ppl,
        "ppl_base": base_ppl,
        "tasks": tasks,
        "timing": {"calibration_s": calibration_s, "eval_s": eval_s},
        "calibration": calib_summary,
        "tasks_bos": _tasks_bos(cfg, model, tokenizer),
        "layer_errors": report.layer_errors() if report is not None else [],
        "decisions": report.decisions() if report is not None else [],
        **({"checkpoint": checkpoint} if checkpoint is not None else {}),
        "memory": {"peak_rss_mb": peak_rss_mb(),
                   "out_of_core": "auto" if auto_offload else "requested" if cfg.offload_dir else None},
        "versions": versions(),
    }
    if cfg.output_path:
        if report is not None and cfg.act_dist_plot:
            results["plots"] = {"dir": "plots", "data": write_plot_data(Path(cfg.output_path), report, cfg.model, cfg.quant.method)}
        write_json_atomic(Path(cfg.output_path) / "results.json", results)
        if cfg.act_dist_plot:
            from eval.plots import render_run_plots

            print(f"plots: {len(render_run_plots(cfg.output_path))} figures in {Path(cfg.output_path) / 'plots'}")
    if store is not None and not cfg.offload_dir:  # resume state is only for interrupted runs
        shutil.rmtree(store.root, ignore_errors=True)
    print(format_summary(results))
    return results
