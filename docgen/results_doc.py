"""Write docs/results.md from the runs stored in docs/runs (docgen.doc_runs) alone: no run is executed and
nothing outside docs/runs is read, so the document regenerates on any machine, byte for byte the same while
the runs are unchanged. scripts/make_results_doc.sh runs and stores the runs, then calls this:

    python -m docgen.results_doc [--runs docs/runs] [--doc docs/results.md] [--model smollm2-135m]

The side-by-side sections are docgen.methods_doc and docgen.ablation_doc, the provenance and budget
docgen.doc_header, the figures docgen.doc_figures."""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from common.errors import UserError
from common.provenance import code_digest
from docgen.ablation_doc import diffs_section, weights_section
from eval.cli import write_atomic
from docgen.doc_figures import figures_dir, figures_section
from docgen.doc_header import budget_lines, provenance_lines, settings_lines, stale_runs
from docgen.doc_plan import PAPER, SECTION_RUNS, all_runs
from docgen.parity_doc import parity_section
from docgen.doc_models import SMOLLM2_ONLY, model_caveat, refused_rows, without_sections
from docgen.doc_runs import load_tree, read_plan, read_step_machines, read_steps
from docgen.doc_stats import compare, fmt_spread, ppl_spread
from docgen.methods_doc import methods_section
from docgen.peer_runs import peer_section
from docgen.readme_data import load_tree as grouped_tree
from eval.runs import method_notes, row_label
from eval.table import render_table, task_columns

REF_KEY, SETS, SCRIPT = "fp16_ptb_ppl_5x512", ("ptb", "wiki_leads"), "scripts/make_results_doc.sh"
EXCLUDED = "command differs from the plan"


def label(run: dict) -> str:
    notes = method_notes(run)
    return row_label(run["config"]) + (f" ({', '.join(notes)})" if notes else "")


def ppl_observations(runs: dict[str, dict]) -> list[str]:
    """The paper rows' extremes and the effect of one setting at a time, with the 2× spread verdict where
    a row ran several seeds (the keys are "ppl/<row>")."""
    out, fp = [], runs.get("ppl/FP16")
    for d in SETS:
        quant = {k: ppl_spread(runs, k, d) for k in (f"ppl/{r}" for r in PAPER[1:]) if k in runs}
        quant = {k: s for k, s in quant.items() if s is not None}
        if fp and d in (fp.get("ppl") or {}) and quant:
            best, worst = min(quant, key=lambda k: quant[k].mean), max(quant, key=lambda k: quant[k].mean)
            out.append(f"- {d}: FP16 {fp['ppl'][d]:.2f}; closest quantized row {label(runs[best])} "
                       f"{fmt_spread(quant[best])}, furthest {label(runs[worst])} {fmt_spread(quant[worst])}.")
    pairs = (("W4A4", "W4A4-per-tensor", "reordering (RPTQ policy: LayerNorm outputs and softmax at 8 bits)"),
             ("W4A4-uniform", "W4A4-uniform-per-tensor", "reordering (uniform policy: every activation at 4 bits)"),
             ("W4A4", "W4A4-uniform", "the activation-bit policy (RPTQ vs uniform, both reordered)"),
             ("W4A16", "W4A8", "8-bit activations (static ranges) on top of 4-bit weights"),
             ("W4A16", "W4A4KV", "quantizing only the K/V cache to 4 bits on top of 4-bit weights"))
    for a, b, what in pairs:
        ka, kb = f"ppl/{a}", f"ppl/{b}"
        if ka in runs and kb in runs:
            parts = []
            for d in SETS:
                sa, sb = ppl_spread(runs, ka, d), ppl_spread(runs, kb, d)
                if sa and sb:
                    different, why = compare(sa, sb)
                    verdict = {True: "different", False: "not different", None: "not judged"}[different]
                    parts.append(f"{d} {label(runs[kb])} {fmt_spread(sb)} vs {label(runs[ka])} {fmt_spread(sa)} "
                                 f"(×{sb.mean / sa.mean:.2f}; {verdict}: {why})")
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
    for t, m in cols:  # a task on which every row scores the same within one stderr ranks nothing here
        got = [(r.get("tasks") or {}).get(t) or {} for r in runs.values()]
        vals, ses = [g[m] for g in got if m in g], [g[m + "_stderr"] for g in got if g.get(m + "_stderr")]
        if len(vals) > 2 and ses and max(vals) - min(vals) < min(ses):
            lines.append(f"- {t} separates no rows: all {len(vals)} lie within {100 * (max(vals) - min(vals)):.1f} "
                         f"points of each other, less than one stderr ({100 * min(ses):.1f}); the model's answers "
                         "there hardly depend on the quantization.")
    errs = [100 * s for r in runs.values() for t, m in cols
            if (s := ((r.get("tasks") or {}).get(t) or {}).get(m + "_stderr"))]
    if errs:
        docs = sorted({r["config"].get("limit") for r in runs.values()})
        lines.append(f"- With {', '.join(map(str, docs))} documents per task one stderr is {min(errs):.1f} to "
                     f"{max(errs):.1f} points, so differences of a few points between rows are noise.")
    return lines


def section(runs: dict[str, dict], name: str, render) -> list[str]:
    """A section renders the rows whose runs exist ("not run" for the others, listed under it)."""
    wanted = [k for k in SECTION_RUNS[name] if "-seed" not in k]
    missing = [k for k in SECTION_RUNS[name] if k not in runs]
    if not any(key in runs for key in wanted if key != "ppl/FP16"):
        return [f"(not run yet: {', '.join(missing)})"]
    return render() + (["", "Not run yet: " + ", ".join(missing) + "."] if missing else [])


def read_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def planned_limits(commands) -> set[str]:
    """The --limit values of planned commands: what a section will use before any of its runs is stored."""
    limits = set()
    for cmd in commands:
        words = shlex.split(cmd)
        limits |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--limit"}
    return limits


def render(root: Path, doc: Path, model: str, digest: str) -> str:
    """The document's text from the runs under root (figures drawn next to doc)."""
    stored = load_tree(root) if root.is_dir() else {}
    plan_rows = read_plan(root)
    plan = {key: cmd for _, _, key, cmd in plan_rows}
    steps = read_steps(root)
    stale = stale_runs(stored, digest, plan)
    runs = {k: r for k, r in stored.items() if stale.get(k) != EXCLUDED}  # other settings: not shown
    planned = list(plan) or all_runs()
    missing = [k for k in planned if k not in runs]
    group = lambda sub: {k.split("/")[1]: r for k, r in runs.items() if k.startswith(sub + "/")}  # noqa: E731
    tasks, ref = group("tasks"), group("ref")
    calibrated = [r for r in runs.values() if r.get("calibration") and r["config"].get("nsamples")]
    cfg = (runs.get("ppl/W4A4") or (calibrated or [{"config": {}}])[0])["config"]
    versions = sorted({f"torch {v.get('torch')}, transformers {v.get('transformers')}, lm_eval {v.get('lm_eval')}"
                       for v in ((r.get("versions") or {}) for r in runs.values())})
    commands = [cmd for _, _, _, cmd in plan_rows] or sorted(r["_command"] for r in runs.values() if r["_command"])
    task_docs = ", ".join(sorted({str(r["config"]["limit"]) for r in tasks.values()})
                          or planned_limits(c for k, c in plan.items() if k.startswith("tasks/"))) or "?"
    paper = [runs[f"ppl/{r}"] for r in PAPER if f"ppl/{r}" in runs]
    where = f"docs/{root.name}"  # docs/runs (SmolLM2) or docs/runs-<model>
    L = [f"# RPTQ results on {model}", "",
         f"<!-- generated by {SCRIPT} (python -m docgen.results_doc) from {where}; do not edit by hand -->", "",
         f"Every number below is read from the runs stored under `{where}/<section>/<run>/` (each a results.json "
         "and the command that produced it); nothing is typed in by hand and nothing else is read, so "
         "`python -m docgen.results_doc` rebuilds this file and its figures on any machine. "
         f"`{SCRIPT}` reruns a run only when its stored command or code digest differs from the checkout's.", "",
         *provenance_lines(runs, steps, digest, stale, missing, len(planned)), "",
         "## Model and caveat", "", *model_caveat(model, refused_rows(root)), "", "## Settings", "", *settings_lines(runs, cfg),
         f"- Zero-shot: lm-eval's task definitions on local copies of the data (`--tasks_source local`), first "
         f"{task_docs} documents per task (the whole set where it is smaller: openbookqa has 500), 0-shot; each "
         "column is the metric the RPTQ paper reports for the task (acc_norm for piqa, ARC and OpenBookQA; acc for "
         "boolq), named in its header, ± lm-eval's stderr. lambada_openai is not available offline.",
         "- Row names follow the paper: WxAy = x-bit weights, y-bit activations; KV = only the K/V cache "
         "quantized. Default (RPTQ) policy: LayerNorm outputs and softmax at max(8, y) bits; `uniform` = every "
         "activation at y bits; `per-tensor baseline` = `--reorder \"\"` (no channel reordering).", "",
         "## Machine", "", *(read_lines(root / "machines.txt") or ["(no machine recorded)"]),
         *(f"- {v}" for v in versions), "",
         "## Commands", "", f"`{SCRIPT}` plans these commands (HF_HUB_OFFLINE=1, each with `--output_path "
         "OUT/<section>/<run>`), in the order it runs them:", "", "```sh", *commands, "```", "",
         "## Perplexity (lower is better)", "",
         *section(runs, "paper", lambda: [render_table(paper).rstrip(), "",
                                          "Seed 2 runs; the methods table below gives mean ± std over seeds 2, 3, 4 "
                                          "for W4A16, W4A8, W4A4 and W4A4 uniform.", "",
                                          "Observations (generated from the numbers above):", "",
                                          *ppl_observations(runs)]), "",
         "## Methods side by side", "",
         "Every row: the same calibration and evaluation windows; ×FP16 = perplexity / FP16 perplexity on that "
         "set. The method column is what results.json records the preset expanded to.", "",
         *section(runs, "methods", lambda: methods_section(runs)), "",
         "## Side by side with llm-compressor", "",
         *peer_section(root, grouped_tree(root)), "",
         "## Weight-only: binary coding (GPTQT)", "",
         "Weights at 3 and 2 bits, activations FP16 (`--abits 16`), no reordering (`--reorder \"\"`, so per row "
         "means per output row), `--grid full --w_range minmax`; GPTQT and BCQ store each weight group as binary "
         "codes with per-row scales (see [GPTQT and BCQ](methods/gptqt.md)).", "",
         *section(runs, "weights", lambda: weights_section(runs, model == "smollm2-135m")), "",
         "## Differences from the reference", "",
         "Each item where this toolkit offers an alternative to the RPTQ reference code's behaviour (our default "
         "follows the reference): the default run against the same run with one flag changed, on PTB only.", "",
         *section(runs, "diffs", lambda: diffs_section(runs)), "",
         "## Parity with the official implementations", "",
         "The authors' own code, run here on CPU on a shared fixture, beside ours with the flags that give its "
         "semantics (`tests/test_parity_*.py` assert these figures; how each tolerance was measured is in the "
         "test's docstring). rel. = ours / official - 1; excess = log ppl - log FP. This fixture is a random "
         "model, so the absolute perplexities mean nothing: what is compared is the arithmetic. How far a real figure "
         "moves between machines (one SmolLM2 W4A4 run on two CPU code paths, beside the spread over seeds above): "
         "[benchmarks](benchmarks.md#one-run-on-two-cpu-code-paths).", "",
         *parity_section(), "",
         "## Figures", "",
         "Per-channel activation ranges over the calibration tokens of the middle layer, before and after "
         "RPTQ's reordering (red: each cluster's quantization range), drawn from the plot data stored with the "
         "runs, and the per-layer error of the quantized block against the FP block on the same inputs "
         "(results.json `layer_errors`).", "",
         *section(runs, "paper", lambda: figures_section(runs, doc)), "",
         "## Zero-shot accuracy (higher is better)", "",
         *section(runs, "tasks", lambda: task_section(tasks)), "",
         "## Reference figure", "",
         *(reference_lines(ref["fp16-5x512"]["ppl"]["ptb"], model) if "fp16-5x512" in ref
           else ["(not run yet: ref/fp16-5x512)"]), "",
         "## Wall time", "", "calib / eval are from each results.json (`timing`); process is the whole command "
         "including model load, threads is OMP_NUM_THREADS and parallel the number of runs the script ran at once, "
         f"from {where}/steps.tsv. The machine is shared, so treat the times as indicative.", "",
         *budget_lines(runs, steps, read_step_machines(root)), ""]
    if plan and not any(k.startswith(("weights/", "diffs/")) for k in plan):
        L = without_sections(L, SMOLLM2_ONLY)  # a second model's plan (make_results_doc.sh): not its sections
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m docgen.results_doc", description=__doc__.split(":")[0])
    p.add_argument("--runs", default="docs/runs", help="the stored runs (default docs/runs)")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--code-digest", help="compare the runs with this digest (default: the checkout's)")
    args = p.parse_args(argv)
    try:
        text = render(Path(args.runs), Path(args.doc), args.model, args.code_digest or code_digest())
        write_atomic(args.doc, text)
        drop_unreferenced_figures(Path(args.doc), text)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def drop_unreferenced_figures(doc: Path, text: str) -> list[str]:
    """Delete the PNGs in the doc's own figures folder that it no longer embeds: a figure of an earlier
    generation must not sit in the repository looking current. Returns their names."""
    folder = figures_dir(doc)
    stale = [p for p in sorted(folder.glob("*.png")) if f"{folder.name}/{p.name}" not in text]
    for path in stale:
        path.unlink()
    return [p.name for p in stale]


def reference_lines(ref_ppl: float, model: str) -> list[str]:
    return [f"<!-- {REF_KEY}: {ref_ppl:.4f} -->", "",
            f"FP16 {model} perplexity on the first 5 windows of 512 tokens of PTB validation is "
            f"**{ref_ppl:.4f}** (`main.py {model} --wbits 16 --abits 16 --eval_ppl --ppl_datasets ptb --limit 5 "
            "--seqlen 512`). `tests/test_results_doc.py` recomputes it and requires agreement within 1%."]


if __name__ == "__main__":
    sys.exit(main())
