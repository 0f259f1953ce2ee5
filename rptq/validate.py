"""A run's flags checked against each other before any model is loaded: fail in seconds, not after calibration."""
from __future__ import annotations

from pathlib import Path

import torch

from common.errors import UserError
from eval.data import check_dataset_name
from eval.tasks import check_tasks

from .export import check_export_dir
from .export_rules import export_refusal
from .run_config import RunConfig


def check_dir_arg(flag: str, value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a directory")
    return path


def validate(cfg: RunConfig) -> None:
    """Everything checkable before a model is loaded: fail in seconds, not after calibration."""
    for flag in ("output_path", "offload_dir", "save_quantized"):
        check_dir_arg(f"--{flag}", getattr(cfg, flag))
    if cfg.eval_ppl:
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
