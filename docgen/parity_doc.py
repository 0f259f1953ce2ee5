"""The results doc's "Parity with the official implementations" section, rendered from the official runs'
records (tests/parity/<method>.json, made by scripts/parity/<method>_official.py) and this project's figures on
the same fixture (tests/parity/<method>-ours.json, made by scripts/parity/ours.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

PARITY = Path(__file__).resolve().parent.parent / "tests" / "parity"


def _rel(a: float, b: float) -> str:
    return f"{a / b - 1:+.1e}"


def _spread(setting: dict, fp: float) -> str:
    seeds = setting.get("ppl_by_kmeans_seed") or setting.get("ppl_by_rotation_seed")
    if seeds:
        kind = "k-means" if "ppl_by_kmeans_seed" in setting else "rotation"
        excess = [math.log(p / fp) for p in seeds.values()]
        return f"{min(excess):+.1e} … {max(excess):+.1e} ({kind} seeds {', '.join(seeds)})"
    jitter = setting.get("ppl_by_jitter")
    if jitter:
        excess = [math.log(p / fp) for p in (setting["ppl"], *jitter.values())]
        return f"{min(excess):+.1e} … {max(excess):+.1e} (as is and {len(jitter)} float-noise draws of the weights)"
    return "—"


def _ours_excess(setting: dict, parity: dict, ours: dict) -> str:
    """Ours' excess over our FP, beside an official spread."""
    fp = ours["settings"].get("FP", {}).get("parity_flags", {}).get("ppl")
    if _spread(setting, 1.0) == "—" or not parity or fp is None:
        return ""
    return f"; ours {math.log(parity['ppl'] / fp):+.1e}"


def _fixture_line(spec: dict) -> str:
    model, windows = spec["model"], spec["windows"]
    if model["kind"] == "opt":
        what = (f"a {model['num_hidden_layers']}-layer OPT, hidden {model['hidden_size']}, random weights with "
                f"x{model['outliers']['scale']:g} outliers on {model['outliers']['channels']} channels per edge "
                "(function-preserving)")
    elif model["kind"] == "llama":
        what = (f"a {model['num_hidden_layers']}-layer Llama, hidden {model['hidden_size']} in "
                f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} KV heads), MLP "
                f"{model['intermediate_size']}, random weights (std {model['initializer_range']:g}) with "
                f"{model['massive_channels']['channels']} residual channels x{model['massive_channels']['scale']:g} "
                "(massive activations)")
    else:
        what = f"{model['kind']} ({model['weights']})"
    return (f"- Fixture: {what}; {windows['calibration']['count']} calibration windows of {windows['seqlen']} "
            f"tokens of {windows['dataset']} {windows['calibration']['split']} (seed {windows['calibration']['seed']}), "
            f"the first {windows['evaluation']['first']} of its {windows['evaluation']['split']} split; windows digest "
            f"`{spec['windows_digest']}` (`scripts/parity/fixture.py`).")


def _ours_line(record: dict, ours: dict | None) -> str:
    shared = record["shared_flags"]
    line = "- Ours: the flags in the table" + (f" plus `{' '.join(shared)}`; \"defaults\" leaves those out"
                                              if shared else "") + "."
    return line + (f" Computed by code digest `{ours['code_digest']}`." if ours and ours.get("code_digest") else "")


def _method_lines(name: str, record: dict, ours: dict | None) -> list[str]:
    official = record["official"]
    versions = ", ".join(f"{k} {v}" for k, v in official["versions"].items())
    L = [f"### {name}: {official['repo']} @ `{official['commit'][:10]}`", "",
         _fixture_line(record["fixture"]),
         f"- Official run: `{record['command']}` ({versions}). Changes made to run it on CPU:",
         *(f"  - {p}" for p in official["patches"]),
         _ours_line(record, ours), ""]
    if ours is None:
        return L + ["(ours not computed yet: run `python scripts/parity/ours.py tests/parity/<method>.json`)", ""]
    fp = record["settings"]["FP"]["ppl"]
    paths = ", ".join(f"{path}: `{env}`" for path, env in record.get("cpu_paths", {}).items())
    L += [f"Other CPU code paths the official code ran on ({paths or 'none'}): the official figure moves by the "
          "rel. shown under \"official, other path\"; a tolerance is at least twice that move.", "",
          "| setting | our flags | official ppl | official, other path | ours | rel. | ours, defaults | rel. | "
          "official excess over FP across seeds or float-noise draws; ours | layer 0 GPTQ weight error: official / ours |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for setting_name, setting in record["settings"].items():
        mine = ours["settings"].get(setting_name, {})
        parity, default = mine.get("parity_flags", {}), mine.get("defaults", {})
        errors = setting.get("gptq_weight_error_by_layer")
        error = (f"{errors[0]:.6f} / {parity['gptq_weight_error_layer0']:.6f}"
                 if errors and "gptq_weight_error_layer0" in parity else "—")
        flags = " ".join(f or '""' for f in setting["our_flags"]) or "(unquantized)"
        other = ", ".join(_rel(p, setting["ppl"]) for p in setting.get("ppl_by_cpu_path", {}).values()) or "—"
        L.append(f"| {setting_name} | `{flags}` | {setting['ppl']:.3f} | {other} | "
                 + (f"{parity['ppl']:.3f} | {_rel(parity['ppl'], setting['ppl'])}" if parity else "— | —")
                 + " | " + (f"{default['ppl']:.3f} | {_rel(default['ppl'], setting['ppl'])}" if default
                            else "= ours | " if parity and not record["shared_flags"] else "— | —")
                 + f" | {_spread(setting, fp)}{_ours_excess(setting, parity, ours)} | {error} |")
    notes = [f"- {n}: a deliberate difference: {s['deliberate_difference']}." for n, s in record["settings"].items()
             if "deliberate_difference" in s]
    return L + ([""] + notes if notes else []) + [""]


def parity_section(root: Path = PARITY) -> list[str]:
    records = sorted(p for p in root.glob("*.json") if not p.stem.endswith("-ours")) if root.is_dir() else []
    if not records:
        return ["(no official run recorded yet under tests/parity/)"]
    L = []
    for path in records:
        ours_path = path.with_name(f"{path.stem}-ours.json")
        ours = json.loads(ours_path.read_text()) if ours_path.is_file() else None
        L += _method_lines(path.stem.upper(), json.loads(path.read_text()), ours)
    return L
