"""This project's figures on a parity fixture: for each setting an official run recorded (tests/parity/<method>.json),
run ours with the recorded flags on the same model and windows, rebuilt in process (scripts/parity/fixture.py),
once with the flags that give the official semantics and once with this project's defaults, and write them beside
the official ones for the docs (tests/parity/<method>-ours.json):

    .venv/bin/python scripts/parity/ours.py tests/parity/rptq.json

The parity tests call :func:`run` themselves; this file only stores what the docs show.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.provenance import code_digest  # noqa: E402
from eval.ppl import perplexity  # noqa: E402
from models.registry import adapter_for  # noqa: E402
from quant.gptq import GPTQ  # noqa: E402
from rptq.cli import build_parser  # noqa: E402
from rptq.flags import build_config  # noqa: E402
from rptq.pipeline import quantize_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture  # noqa: E402  (scripts/parity/fixture.py, beside this file)


def inputs(record: dict, work: Path):
    """(model builder, calibration windows, evaluation windows) of a record's fixture, after checking that the
    windows are the ones the official run read."""
    tok = fixture.tokenizer(work / "tokenizer", record["fixture"])
    calib, evaluation = fixture.build_windows(tok, record["fixture"], cache_dir=str(work / "cache"))
    digest = fixture.windows_digest(calib, evaluation)
    if digest != record["fixture"]["windows_digest"]:
        raise SystemExit(f"windows digest {digest} != the record's {record['fixture']['windows_digest']}")
    return (lambda: fixture.build_model(record["fixture"])), calib, evaluation


def config(flags: list[str]):
    return build_config(build_parser().parse_args(["fixture", *flags])).quant


def gptq_weight_error(model, calib: torch.Tensor, cfg, monkeypatch_target=GPTQ) -> float | None:
    """Layer 0's GPTQ weight error sum ||Q - W||^2 / sum ||W||^2 over its linears (None: no GPTQ), from a copy
    of the model cut to that layer (its quantization does not depend on the layers after it)."""
    one = copy.deepcopy(model)
    body = one.model.decoder if hasattr(one.model, "decoder") else one.model  # OPT or Llama
    body.layers = nn.ModuleList(body.layers[:1])
    one.config.num_hidden_layers = 1
    calls = []  # two sweeps run side by side in threads (rptq/weights.py): append, never read-modify-write
    original = monkeypatch_target._quantize

    def measured(self, weight, *a, **k):
        q, codes = original(self, weight, *a, **k)
        w = weight.detach().float()
        calls.append((float((q.float() - w).pow(2).sum()), float(w.pow(2).sum())))
        return q, codes

    monkeypatch_target._quantize = measured
    try:
        quantize_model(one, adapter_for(one.config), calib, cfg, progress=False)
    finally:
        monkeypatch_target._quantize = original
    calls.sort()  # a fixed order of the float sums, whichever sweep finished first
    total = sum(c[1] for c in calls)
    return sum(c[0] for c in calls) / total if total else None


def run(build_model, calib: torch.Tensor, evaluation: torch.Tensor, flags: list[str] | None) -> dict:
    """Our perplexity (and layer 0's GPTQ weight error) with ``flags`` (None: the unquantized model)."""
    model = build_model()
    if flags is None:
        return {"ppl": perplexity(model, evaluation, progress=False)}
    cfg = config(flags)
    error = gptq_weight_error(model, calib, cfg) if cfg.weight_bits < 16 and cfg.w_quantizer == "gptq" else None
    quantize_model(model, adapter_for(model.config), calib, cfg, progress=False)
    return {"ppl": perplexity(model, evaluation, progress=False),
            **({"gptq_weight_error_layer0": error} if error is not None else {})}


# How close ours must come to an official figure (how each was measured: tests/test_parity_official.py's docstring).
EXACT = 1e-5  # unquantized: the same arithmetic up to float noise
ROUNDING = 1e-4  # quantized, neither GPTQ nor k-means: a few roundings flip (SmoothQuant W8A8 5.9e-5)
NEAR = 1e-3  # GPTQ: a few roundings flip from layer 2 on, and GPTQ carries them along
WEIGHT_ERROR = 2e-4  # layer 0's GPTQ weight error: bit-identical weights, room for a few flipped roundings


def official_seeds(setting: dict) -> dict:
    """The official figure per seed where it depends on one (k-means seed or rotation seed), else {}."""
    return setting.get("ppl_by_kmeans_seed") or setting.get("ppl_by_rotation_seed") or {}


def official_draws(setting: dict) -> list[float]:
    """The official figures that together make its distribution: one per seed where it depends on one; for a
    deterministic setting rerun on float-noise draws of the model (``ppl_by_jitter``), its own figure and those;
    plus its figures on other CPU code paths. [] where the official figure is a single number."""
    seeds = list(official_seeds(setting).values())
    jitter = list(setting.get("ppl_by_jitter", {}).values())
    if not seeds and not jitter:
        return []
    return (seeds or [setting["ppl"], *jitter]) + list(setting.get("ppl_by_cpu_path", {}).values())


def inside_spread(ours_excess: float, excess: list[float]) -> bool:
    """Whether ours, as one more draw, belongs to the official draws (excess over FP, log ppl - log FP): inside
    their range widened by one standard deviation, or within three standard deviations of their mean."""
    import statistics

    spread, mean = statistics.stdev(excess), statistics.fmean(excess)
    return min(excess) - spread <= ours_excess <= max(excess) + spread or abs(ours_excess - mean) <= 3 * spread


def mismatches(record: dict, name: str, got: dict, fp_ppl: float) -> list[str]:
    """Why ``got`` (ours on setting ``name``) does not reproduce the official figure; [] when it does.

    Perplexity: within ROUNDING (no GPTQ, no k-means) or NEAR, widened to twice the official figure's own move to
    another CPU code path where one was recorded (the official code is only defined up to that across machines).
    Where the official figure is a distribution (RPTQ's k-means seeds, DuQuant's and QuaRot's random rotations, or
    a deterministic setting's float-noise draws where 4-bit roundings flip chaotically): the excess over FP inside
    that distribution (:func:`inside_spread`). Layer 0's GPTQ weight error within WEIGHT_ERROR. A setting marked as
    a deliberate difference must show it: its weight error differs by more than that, or (no GPTQ) its excess over
    FP lies outside the official distribution."""
    import math

    setting = record["settings"][name]
    official, errors = setting["ppl"], setting.get("gptq_weight_error_by_layer")
    ours_error = got.get("gptq_weight_error_layer0")
    others = list(setting.get("ppl_by_cpu_path", {}).values())
    draws = official_draws(setting)
    if draws:
        fp = record["settings"]["FP"]["ppl"]
        excess = [math.log(p / fp) for p in draws]
        ours_excess = math.log(got["ppl"] / fp_ppl)
    if "deliberate_difference" in setting:
        if errors:
            moved = abs(ours_error / errors[0] - 1)
            return [] if moved > WEIGHT_ERROR else [f"{name}: the difference is not visible (weight error {moved:.1e})"]
        inside = inside_spread(ours_excess, excess)
        return [f"{name}: the difference is not visible (excess {ours_excess:.2e} inside the official spread)"] \
            if inside else []
    problems = []
    if draws:
        if not inside_spread(ours_excess, excess):
            problems.append(f"{name}: excess {ours_excess:.2e} outside the official {min(excess):.2e} .. "
                            f"{max(excess):.2e} (over {len(excess)} draws)")
    else:
        gptq_or_clusters = errors is not None
        tolerance = max([NEAR if gptq_or_clusters else ROUNDING, *(2 * abs(p / official - 1) for p in others)])
        if abs(got["ppl"] / official - 1) > tolerance:
            problems.append(f"{name}: ppl {got['ppl']:.4f} vs official {official:.4f} "
                            f"({got['ppl'] / official - 1:+.1e}, tolerance {tolerance:.1e})")
    if errors and abs(ours_error / errors[0] - 1) > WEIGHT_ERROR:
        problems.append(f"{name}: layer 0 GPTQ weight error {ours_error:.7f} vs official {errors[0]:.7f}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", help="an official run's record, e.g. tests/parity/rptq.json")
    ap.add_argument("--only", default=None,
                    help="comma list of settings to rerun, keeping the others' figures from the existing file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    record = json.loads(Path(args.record).read_text())
    path = Path(args.record).with_name(Path(args.record).stem + "-ours.json")
    out = {"record": args.record, "code_digest": code_digest(), "settings": {}}
    if args.only:
        kept = json.loads(path.read_text())
        if kept["code_digest"] != out["code_digest"]:
            raise SystemExit(f"{path} was made by code digest {kept['code_digest']}, not this code's "
                             f"{out['code_digest']}: rerun every setting")
        out["settings"] = kept["settings"]
    names = args.only.split(",") if args.only else list(record["settings"])
    with tempfile.TemporaryDirectory() as tmp:
        build, calib, evaluation = inputs(record, Path(tmp))
        for name in names:
            setting = record["settings"][name]
            if name == "FP":
                out["settings"][name] = {"parity_flags": run(build, calib, evaluation, None)}
                continue
            out["settings"][name] = {
                "parity_flags": run(build, calib, evaluation, setting["our_flags"] + record["shared_flags"]),
                # without shared flags the defaults are these very flags: nothing more to run
                **({"defaults": run(build, calib, evaluation, setting["our_flags"])} if record["shared_flags"] else {})}
            print(name, out["settings"][name])
    out["settings"] = {name: out["settings"][name] for name in record["settings"] if name in out["settings"]}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
