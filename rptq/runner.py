"""One run: load, calibrate, evaluate, report. ``main.py`` builds the RunConfig."""
from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import FP, QuantConfig, bit_manifest
from .errors import UserError


@dataclass(frozen=True)
class RunConfig:
    model: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval_ppl: bool = False
    ppl_datasets: tuple[str, ...] = ("wikitext2", "ptb", "c4")
    tasks: tuple[str, ...] = ()
    tasks_source: str = "auto"
    num_fewshot: int = 0
    limit: int = -1
    nsamples: int = 128
    seqlen: int | None = None
    calib_dataset: str = "mix"
    cache_dir: str | None = None
    output_path: str | None = None
    device: str = "auto"
    progress: bool = True

    def flat(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "quant"}
        out.update(dataclasses.asdict(self.quant))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _needs_calibration(manifest: dict) -> bool:
    return any(entry["bits"] < FP for entry in manifest.values())


def check_output_path(output_path: str | None) -> Path | None:
    if not output_path:
        return None
    out = Path(output_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_path {out} is a file; pass a directory (results.json is written inside it)")
    return out


def run(cfg: RunConfig) -> dict:
    from eval.data import calibration_windows, check_dataset_name, eval_windows
    from eval.ppl import perplexity
    from eval.report import format_summary, versions, write_json_atomic
    from models.loading import load_model, pick_device
    from rptq.pipeline import quantize_model

    out_dir = check_output_path(cfg.output_path)
    ppl_sets = cfg.ppl_datasets if cfg.eval_ppl else ()
    for name in ppl_sets:
        check_dataset_name(name, "ppl")
    device = pick_device(cfg.device)
    model, tokenizer, adapter = load_model(cfg.model, device, cfg.cache_dir)
    max_pos = adapter.max_positions(model.config)
    seqlen = cfg.seqlen or max_pos
    if seqlen > max_pos:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions; use --seqlen {max_pos} or less")
    manifest = bit_manifest(cfg.quant, adapter.block_spec(model.config))

    calibration_s, calib_summary = 0.0, None
    if _needs_calibration(manifest):
        check_dataset_name(cfg.calib_dataset, "calibration")
        windows = calibration_windows(tokenizer, cfg.calib_dataset, cfg.nsamples, seqlen, cfg.quant.seed,
                                      cfg.cache_dir)
        report = quantize_model(model, adapter, windows, cfg.quant, device, progress=cfg.progress)
        calibration_s, calib_summary = report.total_s, report.summary()

    start = time.perf_counter()
    limit = cfg.limit if cfg.limit > 0 else None
    ppl = {}
    for name in ppl_sets:
        windows = eval_windows(tokenizer, name, seqlen, cfg.cache_dir)
        ppl[name] = perplexity(model, windows, device, limit=limit, progress=cfg.progress, desc=f"ppl {name}")
    tasks = {}
    if cfg.tasks:
        from eval.tasks import evaluate_tasks

        tasks = evaluate_tasks(model, tokenizer, list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit,
                               source=cfg.tasks_source, device=str(device), seed=cfg.quant.seed,
                               cache_dir=cfg.cache_dir)
    eval_s = time.perf_counter() - start

    results = {
        "model": cfg.model,
        "config": {**cfg.flat(), "seqlen": seqlen},
        "bit_manifest": manifest,
        "ppl": ppl,
        "tasks": tasks,
        "timing": {"calibration_s": calibration_s, "eval_s": eval_s},
        "calibration": calib_summary,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "versions": versions(),
    }
    if out_dir is not None:
        write_json_atomic(out_dir / "results.json", results)
    print(format_summary(results))
    return results
