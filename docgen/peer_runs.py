"""The peer's runs (scripts/peer/llmcompressor.py): RUNS/peer/<recipe>/results.json, extra seeds beside them as
<recipe>-seed3, <recipe>-seed4, and RUNS/peer/timing-*/ (calibration time, ours and the peer's back to back); read
back here for docs/results.md's side-by-side section and the README's best-per-setting block."""
from __future__ import annotations

import json
from pathlib import Path

from docgen.doc_runs import base_key
from docgen.readme_data import measure, show
from docgen.readme_headline import SETS

PEER = "peer"


def load_peer(root: Path) -> dict[str, list[dict]]:
    """{recipe: [results.json dicts, by seed]} under root/peer (timing records apart); {} when none."""
    grouped: dict[str, list[dict]] = {}
    for path in sorted((Path(root) / PEER).glob("*/results.json")):
        if path.parent.name.startswith("timing-"):
            continue
        run = json.loads(path.read_text())
        run["_path"] = str(path)
        grouped.setdefault(base_key(path.parent.name), []).append(run)
    for runs in grouped.values():
        runs.sort(key=lambda r: r.get("seed") or 0)
    return grouped


def load_timings(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(root) / PEER).glob("timing-*/results.json"))]


def best_peer(peer: dict[str, list[dict]], setting: str) -> tuple[str, list[dict]] | None:
    """The peer's recipe at ``setting`` with the lowest mean PTB perplexity (None when it ran none there); a
    diagnostic run (a default switched off to explain a difference) is not one of its recipes."""
    return lowest_ptb([(name, runs) for name, runs in peer.items()
                       if runs[0].get("setting") == setting and not runs[0].get("diagnostic")])


def lowest_ptb(groups: list[tuple[str, list[dict]]]) -> tuple[str, list[dict]] | None:
    """The (key, runs) with the lowest mean PTB perplexity over its seeds; None when none has one."""
    ran = [(key, runs) for key, runs in groups if measure(runs, "ptb") is not None]
    return min(ran, key=lambda item: measure(item[1], "ptb").mean) if ran else None


def peer_section(root: Path, tree: dict[str, list[dict]]) -> list[str]:
    """docs/results.md's side-by-side section: each recipe beside the toolkit row it is compared with."""
    peer = load_peer(root)
    if not peer:
        return ["Not run yet: `.venv/bin/python scripts/peer/llmcompressor.py` (it stores its runs under "
                f"{Path(root).as_posix()}/peer/)."]
    first = next(iter(peer.values()))[0]
    versions = first.get("versions") or {}
    fp = {d: measure(tree.get("ppl/FP16"), d) for d in SETS}
    lines = [f"llm-compressor {versions.get('llmcompressor', '?')} (compressed-tensors "
             f"{versions.get('compressed-tensors', '?')}, transformers {versions.get('transformers', '?')}, torch "
             f"{versions.get('torch', '?')}) on the same model, calibration windows and evaluation windows as the "
             "toolkit's rows, in its own virtual environment, made by `scripts/peer/llmcompressor.py`; each recipe "
             "is stored under peer/ with its text. ×N against the toolkit's FP16. Its FP row is the exported model "
             "evaluated by the peer's interpreter: it checks the export and the perplexity formula. Each pair is the "
             "nearest row, not the same recipe: the peer quantizes the inputs of the linear layers only, ours every "
             "point its row's method column names (the W4A4 presets' K/V cache at 4 bits, for one). Both GPTQs "
             "fix every group's scale from the weights before the sweep. The peer orders columns by the Hessian's "
             "diagonal by default (its actorder \"static\"), so its GPTQ recipes sit beside our rows with "
             "`--act_order`; its diagnostic row without it sits beside ours without it (a diagnostic row is never "
             "the peer's best). One difference stays: its symmetric 4-bit grid is max|w| / 7.5 on codes -8..7, "
             "ours (`--grid symmetric`) max|w| / 7 on -7..7.", "",
             "| recipe | setting | PTB | wiki_leads | the toolkit's row beside it | its PTB | its wiki_leads |",
             "|---|---|---:|---:|---|---:|---:|"]
    for name, runs in peer.items():
        ours_key = runs[0].get("compared_with") or ""
        ours = tree.get(ours_key)
        cells = [show(measure(runs, d), fp[d]) for d in SETS]
        theirs = [show(measure(ours, d), fp[d]) for d in SETS]
        lines.append(f"| {name}: {runs[0].get('description', '')} | {runs[0].get('setting', '')} | "
                     + " | ".join(cells) + f" | `{ours_key}` | " + " | ".join(theirs) + " |")
    for t in load_timings(root):
        lines += ["", f"Calibration time, measured back to back on this machine ({t['cpus']} CPUs, load average "
                  f"{t['load_before']:.2f} before): the toolkit's `{t['ours']['command']}` "
                  f"{t['ours']['calibration_s']:.1f} s, llm-compressor's {t['peer']['recipe']} "
                  f"{t['peer']['calibration_s']:.1f} s (×{t['peer']['calibration_s'] / t['ours']['calibration_s']:.2f})."]
    return lines
