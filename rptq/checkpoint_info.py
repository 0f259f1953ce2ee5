"""A checkpoint's own account of itself against the command line: --load_quantized runs are labelled
from quant.json, and flags that contradict it are refused.

The checkpoint is the truth: model, method, bits, every quantization setting and the calibration
settings come from quant.json (the RunConfig of the run that saved it; results.json records them
plus ``loaded_from``). A quantization or calibration flag given with --load_quantized that differs
from the checkpoint's, or a MODEL that is not its model, is a one-line error. Evaluation and
environment flags (--eval_ppl, --ppl_datasets, --limit, --tasks, --seqlen, --output_path, --device,
...) stay free.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common.errors import UserError
from models.content import model_digest

from . import methods
from .config import QuantConfig
from .method_api import flags_of
from .run_config import RunConfig

_SAME_NAME = ("method", "transforms", "wbits", "abits", "only_quant_kv", "abits_policy", "nsamples", "calib_dataset",
              "seed", "metric", "a_dynamic", "a_dynamic_method", "act_clip", "grid", "w_quantizer", "w_range",
              "w_group_size", "percdamp", "act_order", "gptq_order", "disable_w_quant", "disable_a_quant", "block_inputs")


def saved_by_flag() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Flag (argparse dest) -> where what it sets lives in quant.json's "config" (RunConfig.flat()): the shared
    flags listed here, every method flag from its settings' declaration (method name, field)."""
    return {**{name: ((name,),) for name in _SAME_NAME},
            "w_clip": (("w_clip",), ("w_clip_fit",)),
            "pack_weight": (("fp16_scales",),), "scale_format": (("fp16_scales",), ("sf8_scales",)),
            **{flag.name: ((name, field),) for name, cls in methods.settings_classes().items()
               for field, flag in flags_of(cls)}}


_MISSING = object()


def _at(flat: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(flat, dict) or key not in flat:
            return _MISSING
        flat = flat[key]
    return json.loads(json.dumps(flat))  # tuples as lists, as quant.json has them


def _saved(info: dict, path: Path) -> tuple[str, dict]:
    if not isinstance(info.get("model"), str) or not isinstance(info.get("config"), dict):
        raise UserError(f"--load_quantized {path}: quant.json records no model or run config (not written by "
                        "main.py --save_quantized); re-create it with --save_quantized")
    return info["model"], info["config"]


def _same_model(given: str, saved: str, digest: str | None) -> bool:
    if given == saved:
        return True
    if Path(given).exists() and Path(saved).exists() and Path(given).resolve() == Path(saved).resolve():
        return True
    if digest and Path(given).is_dir():  # the same weights elsewhere; never downloads a hub name to compare
        try:
            return model_digest(given)["digest"] == digest
        except (UserError, OSError):
            return False
    return False


def check_load_flags(cfg: RunConfig, given: frozenset[str], info: dict) -> None:
    """MODEL and every quantization/calibration flag given explicitly against quant.json (cheap: no model loaded)."""
    path = Path(cfg.load_quantized)
    if not isinstance(info.get("model"), str) or not isinstance(info.get("config"), dict):
        return  # refused by saved_run_config, after the load has checked the files
    model, saved = _saved(info, path)
    if not _same_model(cfg.model, model, info.get("model_digest")):
        raise UserError(f"MODEL {cfg.model} is not the model checkpoint {path} was quantized from ({model}); pass "
                        f"{model} as MODEL")
    current = cfg.flat()
    saved_by = saved_by_flag()
    for flag in sorted(given & set(saved_by)):
        for where in saved_by[flag]:
            ours, theirs = _at(current, where), _at(saved, where)
            if theirs is not _MISSING and ours != theirs:
                raise UserError(f"--{flag} sets {'.'.join(where)} = {json.dumps(ours)}, but checkpoint {path} was "
                                f"made with {json.dumps(theirs)}; --load_quantized evaluates it as saved: "
                                f"drop --{flag}")


def _quant_from_flat(flat: dict) -> QuantConfig:
    """The QuantConfig a quant.json records: the shared fields, each method's settings under its name."""
    known = {f.name for f in dataclasses.fields(QuantConfig)} - {"settings"}
    values = {k: v for k, v in flat.items() if k in known}
    if "transforms" in values:
        values["transforms"] = tuple(values["transforms"])
    settings = {}
    for name, cls in methods.settings_classes().items():
        if isinstance(flat.get(name), dict):
            settings[name] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in flat[name].items()})
    return QuantConfig(**values, settings=settings)


def saved_run_config(cfg: RunConfig, info: dict, spec) -> RunConfig:
    """``cfg`` with the model, quantization and calibration settings of the run that saved the checkpoint;
    its config must give the bit manifest it stores (an edited quant.json is refused)."""
    path = Path(cfg.load_quantized)
    model, saved = _saved(info, path)
    if "clusters" in saved:  # each method's settings were nested classes of QuantConfig then
        raise UserError(f"--load_quantized {path}: quant.json was written by an older version of this toolkit (its "
                        "settings layout predates the method modules); re-create it with --save_quantized")
    try:
        quant = _quant_from_flat(saved)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--load_quantized {path}: quant.json's config is not a run config ({exc}); re-create it "
                        "with --save_quantized") from None
    stored = {point: {k: v for k, v in entry.items() if k != "transforms"}
              for point, entry in (info.get("bit_manifest") or {}).items()}
    implied = json.loads(json.dumps(methods.bit_manifest(quant, spec)))
    if stored != implied:
        point = next((p for p in sorted(set(stored) | set(implied)) if stored.get(p) != implied.get(p)), None)
        raise UserError(f"--load_quantized {path}: quant.json's bit_manifest says {point} is {stored.get(point)}, its "
                        f"config implies {implied.get(point)} (quant.json edited?); re-create it with --save_quantized")
    return dataclasses.replace(cfg, model=model, quant=quant, nsamples=saved.get("nsamples", cfg.nsamples),
                               calib_dataset=saved.get("calib_dataset", cfg.calib_dataset))


def loaded_from(cfg: RunConfig, info: dict) -> dict:
    """results.json's ``loaded_from``: which checkpoint, and what made it."""
    return {"path": str(cfg.load_quantized), "id": info["checkpoint_id"], "model_digest": info.get("model_digest"),
            "code_digest": info.get("code_digest"), "git": info.get("git"),
            "calibration_seqlen": (info.get("config") or {}).get("seqlen")}


def source_digest(cfg: RunConfig) -> str | None:
    """The content digest of the model a checkpoint is made from (None where it cannot be read locally)."""
    try:
        return model_digest(cfg.model, cfg.cache_dir)["digest"]
    except (UserError, OSError, ValueError):
        return None
