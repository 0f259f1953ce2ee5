"""Zero-shot evaluation of an in-memory model with the lm-eval 0.4 harness.

Online (`source="hub"`), lm-eval's built-in tasks run unchanged. Offline (`source="local"`),
the same built-in task definitions run with only their data source pointed at the local
mirrors built by `eval.task_mirrors`; prompts, choices, targets and metrics stay lm-eval's.
`source="auto"` picks the hub when it is reachable.

BOS: the RPTQ reference's lm-eval 0.3 fork encoded every context with add_special_tokens=False,
so OPT saw no leading `</s>`; lm-eval 0.4's HFLM calls the tokenizer with its defaults, and OPT's
tokenizer prepends `</s>` (id 2) to every context. `bos="auto"` follows the reference for OPT
(no BOS) and HFLM's default (the tokenizer's own convention, e.g. Llama's `<s>`) for the rest.

lm_eval is imported where it is used, on purpose: main.py checks task names (check_tasks) before it
loads a model, and importing lm_eval costs about 2.3 s (measured, 2-core dev box).
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
from typing import Any

import torch

from models.hub import hub_reachable
from common.errors import UserError

from eval import task_mirrors

PAPER_TASKS = ("lambada_openai", "piqa", "arc_easy", "arc_challenge", "openbookqa", "boolq")
OFFLINE_TASKS = tuple(task_mirrors.MIRRORS)
SOURCES = ("auto", "hub", "local")
BOS_CHOICES = ("auto", "on", "off")
NO_BOS_MODEL_TYPES = ("opt",)  # evaluated by the reference without BOS (lm-eval 0.3, add_special_tokens=False)


def resolve_source(source: str) -> str:
    if source not in SOURCES:
        raise UserError(f"unknown tasks source {source!r}; use one of: {', '.join(SOURCES)}")
    if source == "auto":
        return "hub" if hub_reachable() else "local"
    return source


# ---------------------------------------------------------------- BOS
def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer, called with its defaults (as HFLM calls it), starts with its BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def bos_override(model, bos: str = "auto") -> bool | None:
    """HFLM's `add_bos_token` for `bos` ("auto" | "on" | "off"): True / False, or None for
    HFLM's default (the tokenizer's own convention). "auto" is False for OPT (the reference's
    protocol) and None for every other model."""
    if bos not in BOS_CHOICES:
        raise UserError(f"unknown bos setting {bos!r}; use one of: {', '.join(BOS_CHOICES)}")
    if bos != "auto":
        return bos == "on"
    if getattr(getattr(model, "config", None), "model_type", None) in NO_BOS_MODEL_TYPES:
        return False
    return None


def effective_bos(model, tokenizer, bos: str = "auto") -> bool:
    """Whether lm-eval contexts start with the BOS token under `bos` (what to record in results.json)."""
    choice = bos_override(model, bos)
    return tokenizer_adds_bos(tokenizer) if choice is None else choice


def _bos_tokenizer(tokenizer):
    """A tokenizer that prepends BOS by default: `tokenizer` itself, or a copy told to."""
    if tokenizer_adds_bos(tokenizer):
        return tokenizer
    if tokenizer.bos_token_id is None:
        raise UserError(f"{type(tokenizer).__name__} has no BOS token; use bos 'auto' or 'off'")
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its behaviour
    tokenizer.add_bos_token = True
    if not tokenizer_adds_bos(tokenizer):
        raise UserError(f"cannot make {type(tokenizer).__name__} prepend its BOS token; use bos 'auto' or 'off'")
    return tokenizer


# ---------------------------------------------------------------- task selection
def _normalise_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names: list[str] = []
    for t in tasks or []:
        t = str(t).strip()
        if t and t not in names:
            names.append(t)
    if not names:
        raise UserError(f"no tasks given; paper tasks: {','.join(PAPER_TASKS)}")
    return names


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.75)
    return f" (did you mean {', '.join(close)}?)" if close else ""


@functools.lru_cache(maxsize=1)
def _full_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # scans all built-in tasks (~7 s): only for hub runs and error messages


def _check_local(names: list[str], num_fewshot: int) -> None:
    offline = ", ".join(OFFLINE_TASKS)
    for name in names:
        if name in task_mirrors.MIRRORS:
            continue
        if name in task_mirrors.UNAVAILABLE_OFFLINE:
            raise UserError(f"task {name} is not available offline: {task_mirrors.UNAVAILABLE_OFFLINE[name]}; "
                            f"offline tasks: {offline}; run with the hub reachable (--tasks_source hub)")
        known = _full_task_manager().all_tasks
        if name in known:
            raise UserError(f"task {name} is not available offline (offline tasks: {offline}); "
                            f"run with the hub reachable (--tasks_source hub)")
        raise UserError(f"unknown task {name!r}{_suggest(name, list(known) + list(OFFLINE_TASKS))}; "
                        f"available offline: {offline}; online: any lm-eval 0.4 task, e.g. {','.join(PAPER_TASKS)}")
    if num_fewshot:
        raise UserError(f"num_fewshot={num_fewshot} is not available offline: the built-in tasks draw few-shot "
                        f"examples from their train split, which the offline mirrors do not have; use 0 or the hub")


def check_tasks(tasks, num_fewshot: int = 0, source: str = "auto") -> str:
    """Validate task names where they will be served, before any model is loaded or calibrated.

    Returns the resolved source ("hub" or "local")."""
    names = _normalise_tasks(tasks)
    where = resolve_source(source)
    if where == "local":
        _check_local(names, num_fewshot)
    else:
        known = _full_task_manager().all_tasks
        for name in names:
            if name not in known:
                raise UserError(f"unknown task {name!r}{_suggest(name, known)}; lm-eval 0.4 task names, "
                                f"e.g. {','.join(PAPER_TASKS)}")
    return where


# ---------------------------------------------------------------- results
def _plain_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" for an undefined stderr (e.g. one document)
    value = float(value)
    return value if math.isfinite(value) else None


def flatten_results(raw: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `results` block ({task: {"acc,none": x, "acc_stderr,none": s, ...}}) as
    {task: {"acc": x, "acc_stderr": s, ...}} with plain floats only."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key:
                continue  # "alias", "name", "sample_len"
            metric, _, filt = key.partition(",")
            number = _plain_number(value)
            if number is not None:
                row[metric if filt == "none" else f"{metric},{filt}"] = number
        out[task] = row
    return out


def run_lm_eval(model, tokenizer, tasks: list[str], task_manager, num_fewshot: int = 0,
                limit: int | float | None = None, batch_size: int | str = 1, seed: int = 0,
                bootstrap_iters: int = 1000, add_bos: bool | None = None) -> dict[str, dict[str, float]]:
    """`lm_eval.simple_evaluate` on an in-memory model already placed on its device.

    `add_bos`: True/False = contexts with/without the BOS token; None = HFLM's default
    (the tokenizer's own convention)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if add_bos:
        tokenizer = _bos_tokenizer(tokenizer)
    # HFLM passes add_special_tokens=add_bos_token to the tokenizer for every context
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
    raw = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    return flatten_results(raw or {})


def evaluate_tasks(model, tokenizer, tasks: list[str], num_fewshot: int = 0, limit: int | None = None,
                   source: str = "auto", batch_size: int = 1, device: str = "cpu", seed: int = 0,
                   cache_dir: str | None = None, bootstrap_iters: int = 1000,
                   bos: str = "auto") -> dict[str, dict[str, float]]:
    """Evaluate `model` (a transformers causal LM, used as a black box) on lm-eval tasks.

    Returns {task: {metric: value, metric + "_stderr": value, ...}} with plain floats.
    `source`: "hub" = lm-eval's built-in tasks and datasets; "local" = the same task
    definitions on the offline mirrors (see eval/task_mirrors.py); "auto" = hub if reachable.
    `bootstrap_iters` only affects bootstrapped stderrs (lambada perplexity); lm-eval's CLI uses
    100000, which takes minutes on a small CPU. `bos`: "auto" | "on" | "off", whether contexts
    start with the BOS token; `effective_bos(model, tokenizer, bos)` says what "auto" chose.
    """
    names = _normalise_tasks(tasks)
    add_bos = bos_override(model, bos)
    if num_fewshot < 0:
        raise UserError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be positive, got {limit}")
    where = check_tasks(names, num_fewshot, source)
    if where == "local":
        from lm_eval.tasks import TaskManager

        try:
            conf_dir = task_mirrors.write_task_configs(names, cache_dir)
        except task_mirrors.MirrorError as exc:
            raise UserError(f"offline task data unusable: {exc}") from exc
        manager = TaskManager(include_path=str(conf_dir), include_defaults=False)
    else:
        manager = _full_task_manager()

    target = torch.device(device)
    original = next(model.parameters()).device
    moved = original != target and not (target.type == original.type and target.index is None)
    if moved:
        model.to(target)
    try:
        with torch.no_grad():
            results = run_lm_eval(model, tokenizer, names, manager, num_fewshot=num_fewshot, limit=limit,
                                  batch_size=batch_size, seed=seed, bootstrap_iters=bootstrap_iters,
                                  add_bos=add_bos)
    finally:
        if moved:
            model.to(original)
    return results


# ---------------------------------------------------------------- table
def _fmt(value: float | None, stderr: float | None, scale: float) -> str:
    if value is None:
        return "–"
    text = f"{value * scale:.2f}"
    return text + (f" ± {stderr * scale:.2f}" if stderr is not None else "")


def format_task_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table in the paper's layout: one column per task (paper tasks first, in the
    paper's order), accuracy in percent; acc_norm and lambada perplexity in extra rows."""
    tasks = [t for t in PAPER_TASKS if t in results] + [t for t in results if t not in PAPER_TASKS]
    rows = [("acc (%)", "acc", 100.0), ("acc_norm (%)", "acc_norm", 100.0), ("perplexity", "perplexity", 1.0)]
    lines = ["| metric | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, key, scale in rows:
        if not any(key in results[t] for t in tasks):
            continue
        cells = [_fmt(results[t].get(key), results[t].get(key + "_stderr"), scale) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
