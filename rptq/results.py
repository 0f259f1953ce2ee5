"""A run's results: the results.json record, written with the plot data and figures it points to."""
from __future__ import annotations

from pathlib import Path

from common.atomic import write_errors
from eval.report import peak_rss_mb, versions, write_json_atomic

from .evaluate import Evaluation
from .pipeline import CalibrationReport
from .run_config import RunConfig
from .run_report import method_info, write_plot_data


def assemble_results(cfg: RunConfig, seqlen: int, manifest: dict, evaluation: Evaluation, base_ppl: dict,
                     report: CalibrationReport | None, tasks_bos: bool | None, checkpoint: dict | None,
                     auto_offloaded: bool, loaded_from: dict | None = None, export: dict | None = None) -> dict:
    """The record of one run (results.json; eval.table and eval.report read it). ``loaded_from``: the
    --load_quantized checkpoint (``cfg`` then holds its model and settings)."""
    return {
        "model": cfg.model,
        "config": {**cfg.flat(), "seqlen": seqlen},
        "method": method_info(cfg.quant),
        "bit_manifest": manifest,
        "ppl": evaluation.ppl,
        "ppl_base": base_ppl,
        "tasks": evaluation.tasks,
        # A resumed run: every layer's errors and decisions (the earlier attempts' from the resume state),
        # calibration seconds over all attempts, and the first layer this attempt calibrated.
        "timing": {"calibration_s": report.seconds if report is not None else 0.0, "eval_s": evaluation.seconds},
        "resumed_from_layer": report.resumed_from if report is not None else None,
        "calibration": report.summary() if report is not None else None,
        "tasks_bos": tasks_bos,
        "layer_errors": report.layer_errors() if report is not None else [],
        "decisions": report.decisions() if report is not None else [],
        **({"checkpoint": checkpoint} if checkpoint is not None else {}),
        **({"loaded_from": loaded_from} if loaded_from is not None else {}),
        **({"export": export} if export is not None else {}),
        "memory": {"peak_rss_mb": peak_rss_mb(),
                   "out_of_core": "auto" if auto_offloaded else "requested" if cfg.offload_dir else None},
        "versions": versions(),
    }


def write_results(cfg: RunConfig, results: dict, report: CalibrationReport | None) -> None:
    """Into --output_path: the plot data (listed in ``results``), results.json, then the figures. A full disk
    or a read-only place is one line naming the path (the caller has printed the numbers already)."""
    plots = Path(cfg.output_path) / "plots"
    if report is not None and cfg.act_dist_plot:
        with write_errors(plots):
            results["plots"] = {"dir": "plots",
                                "data": write_plot_data(Path(cfg.output_path), report, cfg.model, cfg.quant.method)}
    write_json_atomic(Path(cfg.output_path) / "results.json", results)
    if cfg.act_dist_plot:
        # Lazy on purpose: eval.plots imports matplotlib, ~1.0 s (python -X importtime on the 2-core dev
        # machine), and only --act_dist_plot draws.
        from eval.plots import render_run_plots

        with write_errors(plots):
            print(f"plots: {len(render_run_plots(cfg.output_path))} figures in {plots}")
