"""A run's evaluation: perplexity per dataset (in memory or streamed block by block) and lm-eval tasks."""
from __future__ import annotations

import time
from dataclasses import dataclass

from common.errors import UserError
from eval.data import eval_windows
from eval.ppl import perplexity, streamed_perplexity
from eval.tasks import effective_bos, evaluate_tasks

from .layer_store import LayerStore
from .run_config import RunConfig


@dataclass
class Evaluation:
    ppl: dict
    tasks: dict
    seconds: float


def perplexities(cfg: RunConfig, model, tokenizer, adapter, reader, store: LayerStore | None, device, seqlen: int,
                 limit, wanted: bool | None = None) -> dict:
    """Per --ppl_datasets entry; ``reader`` set: out of core, each block is read back from ``store``."""
    ppl = {}
    for name in cfg.ppl_datasets if (cfg.eval_ppl if wanted is None else wanted) else ():
        windows = eval_windows(tokenizer, name, seqlen, cfg.cache_dir, window_bos(adapter, tokenizer))
        if reader is not None:
            spec = adapter.block_spec(model.config)
            layers = adapter.layers(model)

            def block_at(i):
                return store.load_block(i, adapter.make_block(layers[i], spec), device)

            ppl[name] = streamed_perplexity(model, adapter, windows, block_at, device, limit=limit,
                                            progress=cfg.progress, desc=f"ppl {name}")
        else:
            ppl[name] = perplexity(model, windows, device, limit=limit, progress=cfg.progress, desc=f"ppl {name}")
    return ppl


def evaluate(cfg: RunConfig, model, tokenizer, adapter, reader, store: LayerStore | None, device,
             seqlen: int) -> Evaluation:
    """The perplexities and tasks the flags ask for, timed together."""
    start = time.perf_counter()
    limit = cfg.eval_limit
    ppl = perplexities(cfg, model, tokenizer, adapter, reader, store, device, seqlen, limit)
    tasks = {}
    if cfg.tasks:
        tasks = evaluate_tasks(model, tokenizer, list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit,
                               source=cfg.tasks_source, device=str(device), seed=cfg.quant.seed,
                               cache_dir=cfg.cache_dir, bos=cfg.task_bos)
    return Evaluation(ppl, tasks, time.perf_counter() - start)


def window_bos(adapter, tokenizer) -> int | None:
    """The BOS id that leads every perplexity and calibration window, where the architecture declares that its
    model needs one (Gemma), else None (the GPTQ protocol: windows cut from the running text)."""
    if not adapter.windows_need_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise UserError(f"{adapter.name} windows need a BOS token and the tokenizer has none; use the model's own "
                        "tokenizer")
    return tokenizer.bos_token_id


def tasks_bos(cfg: RunConfig, model, tokenizer) -> bool | None:
    """Whether the tasks ran with a BOS before each context (None: no tasks)."""
    if not cfg.tasks:
        return None
    return effective_bos(model, tokenizer, cfg.task_bos)
