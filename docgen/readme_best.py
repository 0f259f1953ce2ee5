"""The README's best-per-setting block: on each real model, the toolkit's run with the lowest mean PTB perplexity
at W4A4, W4A8, W4A16 and W8A8 (among every stored perplexity run of the methods and ppl sections: nothing chosen
by hand), its spread over seeds, and llm-compressor's best recipe at the same setting beside it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.provenance import code_digest
from docgen.doc_runs import stored_digest
from docgen.peer_runs import best_peer, load_peer, lowest_ptb
from docgen.readme_data import NOT_RUN, load_tree, measure, show
from docgen.readme_headline import SETS

SETTINGS = {"W4A4": (4, 4), "W4A8": (4, 8), "W4A16": (4, 16), "W8A8": (8, 8)}
CANDIDATE_SECTIONS = ("ppl", "methods")  # diffs run on ptb only; weights at 3 and 2 bits; tasks have no perplexity
SEEDS_WANTED = 3


@dataclass(frozen=True)
class Model:
    label: str
    runs: str  # the model's runs tree, a sibling of the README's docs/runs (its own name for SmolLM2)


MODELS = (Model("SmolLM2-135M", "runs"), Model("Gemma 3 270M", "runs-gemma3-270m"))


def setting_of(run: dict) -> str | None:
    """W4A4 … W8A8 for a run quantizing weights and every activation at those widths; None otherwise (KV-only,
    FP16, or another width)."""
    cfg = run.get("config") or {}
    if cfg.get("only_quant_kv") or cfg.get("disable_w_quant") or cfg.get("disable_a_quant"):
        return None
    bits = (cfg.get("wbits"), cfg.get("abits"))
    return next((name for name, b in SETTINGS.items() if b == bits), None)


def best_ours(tree: dict[str, list[dict]], setting: str) -> tuple[str, list[dict]] | None:
    return lowest_ptb([(key, runs) for key, runs in tree.items() if key.split("/")[0] in CANDIDATE_SECTIONS
                       and setting_of(runs[0]) == setting])


def best_block(runs_root: Path) -> str:
    digest = code_digest()
    lines = ["| setting | model | the toolkit's best run | PTB | wiki_leads | llm-compressor's best recipe | PTB | "
             "wiki_leads |", "|---|---|---|---:|---:|---|---:|---:|"]
    notes = set()
    for setting in SETTINGS:
        for model in MODELS:
            root = Path(runs_root).parent / model.runs
            tree, peer = load_tree(root), load_peer(root)
            fp = {d: measure(tree.get("ppl/FP16"), d) for d in SETS}
            ours, theirs = best_ours(tree, setting), best_peer(peer, setting)
            cells = [NOT_RUN, NOT_RUN, NOT_RUN]
            if ours:
                key, runs = ours
                marks = []
                if len(runs) < SEEDS_WANTED:
                    marks.append(f"{len(runs)} seed{'s' if len(runs) > 1 else ''} of {SEEDS_WANTED}")
                    notes.add("seeds")
                if any(stored_digest(r) != digest for r in runs):
                    marks.append("stale")
                    notes.add("stale")
                cells = [f"`{key}`" + (f" ({', '.join(marks)})" if marks else ""),
                         *(show(measure(runs, d), fp[d]) for d in SETS)]
            peer_cells = [NOT_RUN, NOT_RUN, NOT_RUN]
            if theirs:
                name, runs = theirs
                peer_cells = [name, *(show(measure(runs, d), fp[d]) for d in SETS)]
            lines.append(f"| {setting} | {model.label} | " + " | ".join(cells + peer_cells) + " |")
    text = ["Per setting and model, the lowest mean PTB perplexity among the stored runs (every row of "
            "docs/results.md's perplexity and methods tables is a candidate), and llm-compressor's best recipe on "
            "the same windows (`scripts/peer/llmcompressor.py`). ×N = perplexity / that model's FP16; ± = sample "
            "std over calibration seeds. Both models' weights were already low-bit (SmolLM2 Q4_1, Gemma 3 mostly "
            "Q5_0), which flatters W4A16.", ""]
    if "seeds" in notes:
        text += [f"A best run with fewer than {SEEDS_WANTED} seeds is not yet confirmed: its spread is unmeasured.",
                 ""]
    if "stale" in notes:
        text += ["A stale run was made by other quantization code than this checkout's; "
                 "`scripts/make_results_doc.sh` reruns it.", ""]
    return "\n".join(text + lines) + "\n"
