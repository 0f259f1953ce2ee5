"""Runs as results.json records them, and their names: load the files, label each run with the paper's
row name (FP16, W4A16, ..., W4A4KV) and note where it departs from its method's defaults.

The defaults are the run's own: results.json's "method"."defaults" (written by rptq.run_report's
method_info: the settings the run's --method preset implied before any flag). A results.json from
before they were recorded gets only the notes that need no defaults, plus NO_DEFAULTS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from common.errors import UserError

FP = 16  # bits of an unquantized tensor
PAPER_ROWS = ("FP16", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV")
NO_DEFAULTS = "method defaults not recorded"


# ---------------------------------------------------------------- reading a run's config
# results.json's config keeps each method's settings under the method's name (rptq.method_api); runs written
# before the method modules kept some of them under other names, or at the top level (RPTQ's).
_EARLIER_NAMES = {"duquant": "rotation", "smoothquant": "smooth", "quarot": "residual", "spinquant": "spin"}


def method_settings(cfg: dict, method: str) -> dict:
    """One method's settings as a run's config records them (empty if it records none)."""
    found = cfg.get(method)
    if not isinstance(found, dict):
        found = cfg.get(_EARLIER_NAMES.get(method, ""))
    return found if isinstance(found, dict) else {}


def rptq_setting(cfg: dict, name: str, default=None):
    """RPTQ's ``reorder`` or ``kmeans_features``: under "rptq", or at the top level in earlier runs."""
    return method_settings(cfg, "rptq").get(name, cfg.get(name, default))


def clusters(cfg: dict) -> dict[str, int]:
    """Reorder point -> its cluster count as the run's config records it ({} if none)."""
    if isinstance(cfg.get("clusters"), dict):
        return cfg["clusters"]
    rptq = method_settings(cfg, "rptq")
    return {k[:2]: v for k, v in rptq.items() if k.endswith("_clusters")}


# ---------------------------------------------------------------- loading
def _read_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); delete it and rerun that row") from exc
    cfg = data.get("config") if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) for k in ("wbits", "abits")):
        raise UserError(f"{path} is not an RPTQ results.json (no config.wbits / config.abits)")
    data["_path"] = str(path)
    return data


def load_runs(dirs) -> list[dict]:
    """Every results.json under the given directories (searched recursively; a results.json file
    may be named directly), each as its parsed dict plus "_path". Raises UserError when a
    directory is missing, nothing is found, or a file cannot be parsed."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    found: dict[Path, None] = {}
    for entry in dirs:
        root = Path(entry)
        if root.is_file():
            found[root.resolve()] = None
        elif root.is_dir():
            for path in sorted(root.rglob("results.json")):
                if path.is_file():
                    found[path.resolve()] = None
        else:
            raise UserError(f"{root} does not exist; pass the --output_path directories of main.py runs")
    if not found:
        where = ", ".join(str(d) for d in dirs) or "(no directories given)"
        raise UserError(f"no results.json found under {where}; run main.py with --output_path first")
    return [_read_run(path) for path in found]


# ---------------------------------------------------------------- labels
def _bits(cfg: dict) -> tuple[int, int]:
    w = FP if cfg.get("disable_w_quant") else cfg["wbits"]
    a = FP if cfg.get("disable_a_quant") else cfg["abits"]
    return w, a


def row_label(cfg: dict) -> str:
    """The paper's name for a run's bit setting: FP16, W4A16, W4A4, W4A4KV (only K/V quantized)."""
    w, a = _bits(cfg)
    if w >= FP and a >= FP:
        return "FP16"
    return f"W{w}A{a}" + ("KV" if cfg.get("only_quant_kv") and a < FP else "")


def order_key(label: str) -> tuple:
    """Sort key of a row label: the paper's rows in its order, then others by falling bits."""
    if label in PAPER_ROWS:
        return (0, PAPER_ROWS.index(label), 0, 0, 0)
    w, _, rest = label[1:].partition("A")
    a = rest.removesuffix("KV")
    return (1, 0, -int(w), -int(a), label.endswith("KV")) if w.isdigit() and a.isdigit() else (2, 0, 0, 0, 0)


def method_defaults(run: dict) -> dict | None:
    """The settings the run's method preset implied, as its results.json records them (None: not recorded)."""
    defaults = (run.get("method") or {}).get("defaults")
    return defaults if isinstance(defaults, dict) else None


def method_notes(run: dict) -> list[str]:
    """Short notes for method settings of a run (as load_runs returns it) that differ from its method
    preset's defaults (method_defaults) and matter for this run; a method other than RPTQ is named first.
    Without recorded defaults: the method, the settings that need no defaults, then NO_DEFAULTS."""
    cfg = run["config"]
    w, a = _bits(cfg)
    if w >= FP and a >= FP:
        return []
    defaults = method_defaults(run)
    acts = a < FP
    notes = [cfg["method"]] if cfg.get("method", "rptq") != "rptq" else []
    if defaults is None:
        notes += [f"--{flag}" for flag in ("disable_w_quant", "disable_a_quant") if cfg.get(flag)]
        return notes + _dynamic(cfg, acts) + [NO_DEFAULTS]
    if cfg.get("transforms") is not None and list(cfg["transforms"]) != defaults["transforms"]:
        notes.append("transforms " + "+".join(cfg["transforms"]))
    if cfg.get("disable_w_quant"):
        notes.append("--disable_w_quant")
    if cfg.get("disable_a_quant"):
        notes.append("--disable_a_quant")
    reorder = rptq_setting(cfg, "reorder", rptq_setting(defaults, "reorder"))
    reordering = "reorder" in (cfg.get("transforms") or defaults["transforms"])
    if reordering and reorder == "":
        notes.append("per-tensor baseline")
    elif reordering and sorted(reorder) != sorted(rptq_setting(defaults, "reorder")):
        notes.append("reorder R" + ",R".join(sorted(reorder)))
    counts, default_counts = clusters(cfg), clusters(defaults)
    changed = [f"R{p}={counts[f'R{p}']}" for p in sorted(reorder)
               if counts.get(f"R{p}", default_counts[f"R{p}"]) != default_counts[f"R{p}"]]
    if reordering and changed:
        notes.append("clusters " + ",".join(changed))
    if acts and not cfg.get("only_quant_kv") and cfg.get("abits_policy", defaults["abits_policy"]) != \
            defaults["abits_policy"]:
        notes.append(cfg["abits_policy"])
    notes += _dynamic(cfg, acts)
    if acts and cfg.get("metric", defaults["metric"]) != defaults["metric"]:
        notes.append(f"metric {cfg['metric']}")
    features = rptq_setting(cfg, "kmeans_features", rptq_setting(defaults, "kmeans_features"))
    if acts and reordering and features != rptq_setting(defaults, "kmeans_features"):
        notes.append(f"k-means on {features} ranges")
    for key, label in (("grid", "grid"), ("w_range", "weight range"), ("w_group_size", "group"),
                       ("w_clip", "w_clip")):
        if key in cfg and cfg[key] != defaults.get(key):
            notes.append(f"{label} {cfg[key]}")
    if w < FP and cfg.get("w_quantizer", defaults["w_quantizer"]) != defaults["w_quantizer"]:
        notes.append(str(cfg["w_quantizer"]).upper())
    if w < FP and cfg.get("percdamp", defaults["percdamp"]) != defaults["percdamp"]:
        notes.append(f"percdamp {cfg['percdamp']}")
    return notes


def _dynamic(cfg: dict, acts: bool) -> list[str]:
    if acts and cfg.get("a_dynamic"):
        return ["dynamic acts" + (" per token" if cfg.get("a_dynamic_method") == "per_token" else "")]
    return []
