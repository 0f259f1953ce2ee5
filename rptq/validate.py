"""A run's flags checked against each other and the disk before any model is loaded, and against the model's
config before calibration: fail in seconds, not after calibration."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from common.errors import UserError
from eval.data import check_dataset_name, check_windows
from eval.tasks import check_tasks
from models.loading import resolve

from .config import FP
from .methods.rptq import RPTQSettings, reorders
from .checkpoint import read_manifest, user_errors
from .checkpoint_dir import check_save_target
from .checkpoint_info import check_load_flags
from .export import check_export_dir
from .export_rules import export_refusal
from .run_config import RunConfig

DIR_FLAGS = ("output_path", "offload_dir", "save_quantized", "cache_dir")


def check_dir_arg(flag: str, value: str | None) -> Path | None:
    """A directory the run will write into: an existing directory or creatable, and writable (a probe file is
    created and removed; nothing else is made). An unwritable place would otherwise fail after calibration."""
    if not value:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a directory")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists: where mkdir would start
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {existing} is a file; pass a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rptq-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {path} is not writable ({exc.strerror} in {existing}); choose a writable "
                        "directory") from None
    return path


def calibrates(cfg: RunConfig) -> bool:
    """Whether the run will calibrate (some point below 16 bits), as far as the flags tell."""
    return not cfg.load_quantized and (cfg.quant.weight_bits < FP or cfg.quant.act_bits < FP)


def validate(cfg: RunConfig, given: frozenset[str] = frozenset()) -> None:
    """Everything checkable before a model is loaded: fail in seconds, not after calibration.

    ``given``: the flags set on the command line, checked against a --load_quantized checkpoint."""
    for flag in DIR_FLAGS:
        check_dir_arg(f"--{flag}", getattr(cfg, flag))
    if cfg.save_quantized:
        source = resolve(cfg.model)
        if source.kind == "local" and Path(cfg.save_quantized).resolve() == Path(source.location).resolve():
            raise UserError(f"--save_quantized {cfg.save_quantized} is the model's own directory (its config and "
                            "tokenizer would be overwritten); pass another directory")
        check_save_target(cfg.save_quantized)
    if cfg.eval_ppl or cfg.eval_base_ppl:
        for name in cfg.ppl_datasets:
            check_dataset_name(name, "ppl")
    if cfg.tasks:
        if cfg.offload_dir:
            raise UserError("--tasks needs the model in memory; with --offload_dir evaluate perplexity, or save with "
                            "--save_quantized and run the tasks with --load_quantized where the model fits")
        check_tasks(list(cfg.tasks), cfg.num_fewshot, cfg.tasks_source)
    if cfg.multigpu:
        if cfg.offload_dir or cfg.device == "cpu":
            raise UserError("--multigpu shards over GPUs; it cannot be combined with --offload_dir or --device cpu")
        if not torch.cuda.is_available():
            raise UserError("--multigpu needs visible CUDA devices; none found (check CUDA_VISIBLE_DEVICES)")
    if cfg.load_quantized and (cfg.offload_dir or cfg.save_quantized):
        raise UserError("--load_quantized evaluates a saved model; drop --offload_dir/--save_quantized")
    if cfg.load_quantized:
        root = Path(cfg.load_quantized)
        with user_errors(root):
            info = read_manifest(root)
        check_load_flags(cfg, given, info)
    if cfg.eval_base_ppl and (cfg.offload_dir or cfg.load_quantized):
        raise UserError("--eval_base_ppl needs the unquantized model in memory; drop --offload_dir/--load_quantized "
                        "(or run the FP16 row separately with --wbits 16 --abits 16)")
    if cfg.export_dir:
        check_export(cfg)
    if cfg.act_dist_plot and not cfg.output_path:
        raise UserError("--act_dist_plot draws into OUTPUT_PATH/plots; pass --output_path DIR")


def check_export(cfg: RunConfig) -> None:
    """--export: what the flags decide (a --load_quantized model is checked when exported)."""
    check_export_dir(cfg.export_dir)
    if cfg.offload_dir:
        raise UserError("--export needs the quantized model in memory; drop --offload_dir (or --save_quantized here "
                        "and export from --load_quantized where the model fits)")
    reason = None if cfg.load_quantized else export_refusal(cfg.quant)
    if reason:
        raise UserError(f"--export {cfg.export_format}: {reason}")


def check_seqlen(seqlen: int, max_positions: int) -> None:
    """Checkable only once the model's config is known."""
    if seqlen > max_positions:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {max_positions} positions; use --seqlen "
                        f"{max_positions} or less")


def _meta_layer(config, adapter):
    """Decoder layer 0 on the meta device (no memory, no weights read): its linears' widths."""
    # Lazy on purpose: accelerate and transformers' model classes take ~1-2 s to import (2-core dev box), and
    # a run refused by validate() never needs them.
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1  # the layers are alike; one is enough to read the widths
    with init_empty_weights():
        return adapter.layers(AutoModelForCausalLM.from_config(one))[0]


def cluster_limits(spec, layer) -> dict[str, tuple[int, str]]:
    """Reorder point -> (how many clusters it can hold, what they are): the channels k-means sees (per head
    for R2/R3; channel pairs under RoPE)."""
    limits = {e.reorder: (spec.hidden_size, "channels") for e in spec.norm_edges}
    rope = spec.heads.rope
    limits[spec.qk_edge.reorder] = (spec.heads.head_dim // (2 if rope else 1),
                                    "channel pairs per head (RoPE)" if rope else "channels per head")
    for edge in spec.linear_edges:
        limits[edge.reorder] = ((spec.heads.head_dim, "channels per head") if edge.per_head
                                else (layer.get_submodule(edge.consumer).in_features, "channels"))
    return limits


def check_model(cfg: RunConfig, config, adapter, layer=None) -> None:
    """The flags against the model's config (config.json alone, before the load; or the loaded model's, for
    GGUF): the sequence length and the cluster counts. More clusters than channels is refused, not clamped:
    results.json would record a count that was never used."""
    check_seqlen(cfg.seqlen_for(adapter.max_positions(config))[0], adapter.max_positions(config))
    if not calibrates(cfg) or "reorder" not in cfg.quant.transforms:
        return
    limits = cluster_limits(adapter.block_spec(config), layer if layer is not None else _meta_layer(config, adapter))
    for point, (limit, what) in limits.items():
        wanted = cfg.quant.of(RPTQSettings).clusters(point)
        if reorders(cfg.quant, point) and wanted > limit:
            raise UserError(f"--{point}_clusters {wanted} exceeds the model's {limit} {what} at {point}; use "
                            f"--{point}_clusters {limit} or fewer")


def check_calibration_data(cfg: RunConfig) -> None:
    """Before the load (the default `mix` needs the hub), after the cheaper config checks."""
    if calibrates(cfg):
        check_dataset_name(cfg.calib_dataset, "calibration")


def check_texts(cfg: RunConfig, tokenizer, seqlen: int) -> None:
    """file: datasets hold at least one window: needs only the tokenizer, so before calibration."""
    if cfg.eval_ppl or cfg.eval_base_ppl:
        for name in cfg.ppl_datasets:
            check_windows(tokenizer, name, seqlen, "ppl", cfg.cache_dir)
    if calibrates(cfg):
        check_windows(tokenizer, cfg.calib_dataset, seqlen, "calibration", cfg.cache_dir)
