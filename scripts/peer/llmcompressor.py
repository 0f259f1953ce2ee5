"""llm-compressor beside the toolkit: its recipes on our model, calibration windows and evaluation windows, each
result stored as a run under RUNS/peer/ (docs/runs/peer/ for SmolLM2), so docs/results.md and the README show the
peer's rows beside ours from data made by this script.

    .venv/bin/python scripts/peer/llmcompressor.py                        # SmolLM2, every recipe, seeds 2 3 4
    .venv/bin/python scripts/peer/llmcompressor.py --model gemma3-270m --runs docs/runs-gemma3-270m
    .venv/bin/python scripts/peer/llmcompressor.py --recipes W4A16-gptq-g64 --seeds 2
    .venv/bin/python scripts/peer/llmcompressor.py --timing               # calibration time, ours then the peer's

It runs in two interpreters. This one (the project's venv) creates the peer's own venv if missing (VENV, default
out/peer-venv: `pip install torch==2.13.0 llmcompressor==VERSION`), writes the model as a plain Hugging Face
directory (the GGUF dequantized to fp32, `quantization_config` dropped: oneshot refuses a GGUF-quantized config) and
the windows as safetensors: calibration = `calibration_windows(tok, "ptb", 32, 512, seed)`, evaluation = the first
40 windows of 512 of ptb and wiki_leads, each led by BOS where the architecture needs it (Gemma) — exactly what
main.py uses. The peer's interpreter then runs this file with `--stage peer` for one recipe: `oneshot(model,
dataset, recipe)` on those windows (unshuffled), timed, then perplexity by a plain forward per window with the same
formula as eval/ppl.py. A stored run is skipped when its recipe text, seed, windows digest and llm-compressor
version are the same. Nothing of llm-compressor lands in the project: only this script and the figures.
`--timing` runs our W4A16 GPTQ g64 (main.py) and the peer's same recipe back to back, each timed by itself;
run it with nothing else on the machine (it says so in the stored record only as the load average it saw).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.14.0.1"  # the newest llmcompressor the registry served on 2026-12-07
TORCH = "2.13.0"
SEQLEN, NSAMPLES, EVAL_WINDOWS, SETS = 512, 32, 40, ("ptb", "wiki_leads")

# name -> (setting, what it is, the toolkit row it is compared with: its GPTQ recipes beside ours with --act_order,
# its default). Group size 64 because 128 does not divide SmolLM2's 576 (its MLP 1536 too); the peer's
# deterministic Hadamard needs 2^n sizes, so the random one is used.
RECIPES = {
    "FP": ("FP16", "no recipe: the exported model as the peer's interpreter runs it (checks the export)", "ppl/FP16"),
    "W4A16-gptq-g64": ("W4A16", "GPTQ, 4-bit symmetric weights in groups of 64",
                       "methods/W4A16-gptq-g64-act-order"),
    "W8A8-smoothquant-gptq": ("W8A8", "SmoothQuant (0.5) + GPTQ, 8-bit per-channel weights, per-token dynamic "
                              "8-bit activations (its W8A8 scheme)", "methods/W8A8-smoothquant-per-token"),
    "W4A8-gptq-g64-per-token": ("W4A8", "GPTQ g64 symmetric weights + per-token dynamic 8-bit activations",
                                "methods/W4A8-gptq-g64-per-token-act-order"),
    "W4A4-spinquant-gptq-g64": ("W4A4", "SpinQuant R1+R2+R4 (random Hadamard, no learning) + GPTQ g64 + per-token "
                                "dynamic 4-bit activations", "methods/W4A4-spinquant-no-learning"),
    "W4A4-quip-gptq-g64": ("W4A4", "QuIP incoherence (random Hadamard on both sides of every linear, u and v) + "
                           "GPTQ g64 + per-token dynamic 4-bit activations", "methods/W4A4-quarot"),
    # Parity, not a recipe of its own: llm-compressor's GPTQ orders columns by the Hessian's diagonal by default
    # (actorder "static"); this one keeps the GPTQ paper's order, as the toolkit does, so the two W4A16 rows
    # measure what that default is worth. Left out of the peer's best-per-setting choice.
    "W4A16-gptq-g64-no-actorder": ("W4A16", "GPTQ g64 as W4A16-gptq-g64 with activation ordering off (actorder "
                                   "None: the GPTQ paper's column order, as the toolkit's)", "methods/W4A16-gptq-g64"),
}
DIAGNOSTIC = {"W4A16-gptq-g64-no-actorder"}


# Recipes a model cannot take: llm-compressor's SpinQuant maps Gemma3ForCausalLM onto Llama's mappings without a
# word, and a residual rotation cannot pass Gemma 3's post-attention/post-feedforward norms (ours refuses too).
REFUSED = {("gemma3-270m", "W4A4-spinquant-gptq-g64"): "a residual rotation cannot pass Gemma 3's sandwich norms "
           "(llm-compressor would silently apply Llama's mappings)"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- the peer's interpreter (no project imports)

def recipe(name: str, seed: int):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    # The seed picks the calibration windows only: compressed-tensors draws its random Hadamards from a fresh
    # torch.Generator() (unseeded, so its fixed default seed), the same matrices in every run.
    torch.manual_seed(seed)

    def weights_g64(acts: int | None, **gptq):
        w = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
        a = None if acts is None else QuantizationArgs(num_bits=acts, type="int", symmetric=True,
                                                       strategy="token", dynamic=True)
        return GPTQModifier(ignore=["lm_head"], config_groups={"group_0": QuantizationScheme(
            targets=["Linear"], weights=w, input_activations=a)}, **gptq)

    if name == "W4A16-gptq-g64":
        return [weights_g64(None)]
    if name == "W4A16-gptq-g64-no-actorder":
        return [weights_g64(None, actorder=None)]
    if name == "W8A8-smoothquant-gptq":
        return [SmoothQuantModifier(smoothing_strength=0.5), GPTQModifier(targets="Linear", scheme="W8A8",
                                                                          ignore=["lm_head"])]
    if name == "W4A8-gptq-g64-per-token":
        return [weights_g64(8)]
    if name == "W4A4-spinquant-gptq-g64":
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"), weights_g64(4)]
    if name == "W4A4-quip-gptq-g64":
        return [QuIPModifier(rotations=["v", "u"], transform_type="random-hadamard"), weights_g64(4)]
    raise SystemExit(f"error: unknown recipe {name!r}")


def peer_perplexity(model, windows) -> float:
    """eval/ppl.py's formula: exp(summed NLL of tokens 1..T-1 of every window / their count)."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def peer_stage(args) -> None:
    here = Path(__file__).resolve().parent  # this file's name would shadow the package it runs
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    windows = load_file(str(args.work / f"windows-seed{args.seed}.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(args.work / "model"), dtype=torch.float32).eval()
    calibration_s, recipe_text = None, "FP"
    if args.recipe != "FP":
        from llmcompressor import oneshot

        data = Dataset.from_dict({"input_ids": windows["calibration"].tolist(),
                                  "attention_mask": torch.ones_like(windows["calibration"]).tolist()})
        modifiers = recipe(args.recipe, args.seed)
        recipe_text = [repr(m) for m in modifiers]  # before oneshot, which gives them state
        start = time.perf_counter()
        oneshot(model=model, dataset=data, recipe=modifiers, num_calibration_samples=len(data),
                max_seq_length=SEQLEN, shuffle_calibration_samples=False, output_dir=None)
        calibration_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl = {name: peer_perplexity(model, windows[name]) for name in SETS}
    eval_s = time.perf_counter() - start
    from importlib.metadata import version

    out = {"peer": "llm-compressor", "recipe": args.recipe, "seed": args.seed,
           "recipe_text": recipe_text,
           "ppl": ppl, "timing": {"calibration_s": calibration_s, "eval_s": eval_s},
           "threads": torch.get_num_threads(),
           "versions": {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}
    args.result.write_text(json.dumps(out, indent=1, sort_keys=True))


# ---------------------------------------------------------------- the project's interpreter

def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} (llmcompressor=={VERSION}, torch=={TORCH})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={TORCH}", f"llmcompressor=={VERSION}"],
                       check=True)
    return python


def prepare(model_name: str, work: Path, seeds: list[int]) -> None:
    """The plain HF directory and, per seed, the windows main.py would use."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from eval.data import calibration_windows, eval_windows
    from models.loading import load_model
    from rptq.evaluate import window_bos

    model, tok, adapter = load_model(model_name, torch.device("cpu"), dtype=torch.float32)
    bos = window_bos(adapter, tok)
    if not (work / "model" / "config.json").exists():
        import copy

        config = copy.deepcopy(model.config)  # a GGUF-loaded model refuses save_pretrained: copy it into a plain one
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(model)(config).eval()
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(str(work / "model"), safe_serialization=True)
        tok.save_pretrained(str(work / "model"))
    evaluation = {name: eval_windows(tok, name, SEQLEN, bos=bos)[:EVAL_WINDOWS].contiguous() for name in SETS}
    for seed in seeds:
        path = work / f"windows-seed{seed}.safetensors"
        if not path.exists():
            calib = calibration_windows(tok, "ptb", NSAMPLES, SEQLEN, seed, bos=bos)
            save_file({"calibration": calib.contiguous(), **evaluation}, str(path))


def stored_matches(dest: Path, key: dict) -> bool:
    try:
        return json.loads((dest / "results.json").read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def run_peer(python: Path, args, name: str, seed: int) -> dict:
    result = args.work / f"result-{name}-seed{seed}.json"
    env = {**os.environ, "PYTHONPATH": ""}
    cmd = [str(python), __file__, "--stage", "peer", "--work", str(args.work), "--recipe", name, "--seed", str(seed),
           "--result", str(result)]
    log = args.work / f"{name}-seed{seed}.log"
    with log.open("w") as handle:
        if subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: the peer's {name} (seed {seed}) failed; see {log}")
    return json.loads(result.read_text())


def run_all(python: Path, args) -> None:
    for name in args.recipes:
        setting, what, ours = RECIPES[name]
        if (args.model, name) in REFUSED:
            print(f"not run {name} on {args.model}: {REFUSED[args.model, name]}")
            continue
        for seed in args.seeds if name != "FP" else args.seeds[:1]:
            key = {"recipe": name, "recipe_seed": seed, "version": VERSION, "model": args.model,
                   "windows": digest(args.work / f"windows-seed{seed}.safetensors")}
            dest = args.runs / "peer" / (name if seed == args.seeds[0] else f"{name}-seed{seed}")
            if stored_matches(dest, key):
                print(f"skip {dest}: stored, same recipe, seed, windows and version")
                continue
            print(f"== {dest}", flush=True)
            out = run_peer(python, args, name, seed)
            out.update(key=key, setting=setting, description=what, compared_with=ours, model=args.model,
                       diagnostic=name in DIAGNOSTIC,
                       windows={"calibration": f"ptb train, {NSAMPLES} x {SEQLEN}, seed {seed}",
                                "evaluation": f"first {EVAL_WINDOWS} x {SEQLEN} of " + ", ".join(SETS)})
            write_run(dest, out, " ".join(["scripts/peer/llmcompressor.py", "--model", args.model, "--recipes", name,
                                           "--seeds", str(seed)]))
            print(f"done {dest}: " + ", ".join(f"{k} {v:.3f}" for k, v in out["ppl"].items())
                  + (f"; calibration {out['timing']['calibration_s']:.1f} s" if out["timing"]["calibration_s"] else ""))


def write_run(dest: Path, out: dict, command: str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "results.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    (tmp / "command.txt").write_text(command + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def timing(python: Path, args) -> None:
    """Ours (main.py, W4A16 GPTQ g64 symmetric, no evaluation) then the peer's same recipe, seed 2, back to back."""
    seed = args.seeds[0]
    ours_out = args.work / "timing-ours"
    flags = ["--wbits", "4", "--abits", "16", "--reorder", "", "--w_quantizer", "gptq", "--w_group_size", "64",
             "--grid", "symmetric", "--calib_dataset", "ptb", "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
             "--seed", str(seed), "--no_progress"]
    load = os.getloadavg()[0]
    shutil.rmtree(ours_out, ignore_errors=True)
    subprocess.run([sys.executable, str(ROOT / "main.py"), args.model, *flags, "--output_path", str(ours_out)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    ours = json.loads((ours_out / "results.json").read_text())["timing"]["calibration_s"]
    peer = run_peer(python, args, "W4A16-gptq-g64", seed)
    out = {"model": args.model, "seed": seed, "load_before": load, "cpus": os.cpu_count(),
           "ours": {"command": "main.py " + args.model + " " + " ".join(f or "''" for f in flags),
                    "calibration_s": ours},
           "peer": {"recipe": "W4A16-gptq-g64", "calibration_s": peer["timing"]["calibration_s"],
                    "versions": peer["versions"]}}
    write_run(args.runs / "peer" / "timing-W4A16-gptq-g64", out,
              f"scripts/peer/llmcompressor.py --model {args.model} --timing --seeds {seed}")
    print(f"calibration, W4A16 GPTQ g64: ours {ours:.1f} s, llm-compressor {out['peer']['calibration_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "gemma3-270m"))
    ap.add_argument("--runs", type=Path, default=None, help="the model's runs tree (default docs/runs for "
                    "smollm2-135m, docs/runs-<model> otherwise); the peer's runs go under its peer/")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--venv", type=Path, default=ROOT / "out" / "peer-venv")
    ap.add_argument("--work", type=Path, default=None, help="scratch (default out/peer/<model>)")
    ap.add_argument("--timing", action="store_true", help="time ours and the peer's W4A16 back to back")
    ap.add_argument("--stage", choices=("main", "peer"), default="main", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or ROOT / "out" / "peer" / args.model
    if args.stage == "peer":
        return peer_stage(args)
    args.runs = args.runs or ROOT / ("docs/runs" if args.model == "smollm2-135m" else f"docs/runs-{args.model}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(args.venv)
    prepare(args.model, args.work, args.seeds)
    if args.timing:
        return timing(python, args)
    run_all(python, args)


if __name__ == "__main__":
    main()
