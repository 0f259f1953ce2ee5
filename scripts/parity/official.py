"""What every official-code runner under scripts/parity/ shares: a patched copy of the official repository (each
change listed, for the record), its evaluation arithmetic over the fixture's windows, and the record's header
(repository, commit, versions, command, fixture). Runs in the scratch environment beside the official code."""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def copy_with_patches(repo: Path, dest: Path, patches, cuda_no_ops=(), ignore=(), added=()) -> list[str]:
    """Copy ``repo`` to ``dest`` and apply ``patches`` ((file, text, replacement, why), each text must occur);
    write ``added`` files ((file, text, why): stand-ins for CUDA extensions the code imports); make
    ``torch.cuda.<name>`` no-ops for ``cuda_no_ops``. Returns one line per change."""
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(".git", *ignore))
    applied = []
    for rel, old, new, why in patches:
        path = dest / rel
        text = path.read_text()
        count = text.count(old)
        if count == 0:
            raise SystemExit(f"patch target not found in {rel}: {old!r} (another commit of the official code?)")
        path.write_text(text.replace(old, new))
        applied.append(f"{rel}: `{old}` -> `{new}` ({count} place{'s' * (count > 1)}): {why}")
    for rel, text, why in added:
        (dest / rel).write_text(text)
        applied.append(f"{rel} added ({len(text.splitlines())} lines, in the record's `added`): {why}")
    for name in cuda_no_ops:
        setattr(torch.cuda, name, lambda *a, **k: 0)
    if cuda_no_ops:
        applied.append(f"torch.cuda.{', '.join(cuda_no_ops)} made no-ops at run time (the code calls them on CPU "
                       "too)")
    return applied


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """The official evaluation's arithmetic (RPTQ's evaluate, GPTQ's opt_eval: mean token NLL per window, times
    seqlen, summed) over exactly the given windows: exp of the mean of the windows' mean NLL. (RPTQ's --limit path
    divides by every window of the test set, evaluated or not; the fixture passes only the windows to evaluate.)
    OPT runs its decoder, Llama its model body (DuQuant's and QuaRot's evaluations), without a KV cache."""
    nlls = []
    for window in windows:
        batch = window.unsqueeze(0)
        if hasattr(model.model, "decoder"):
            hidden = model.model.decoder(batch)[0]
        else:
            hidden = model.model(batch, use_cache=False)[0]
        logits = model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nlls.append(loss.float() * batch.shape[1])
    return math.exp((torch.stack(nlls).sum() / (len(windows) * windows.shape[1])).item())


def start_record(name: str, repo: Path, patches: list[str], fixture: Path, shared_flags: list[str],
                 out: Path, cpu_path: str = "default") -> dict:
    """The record's header, printed too; settings measured before in ``out`` are kept (--only reruns some). On
    another CPU path, the record as it is, with this run's command added under ``cpu_path_commands``."""
    import sklearn
    import transformers

    if cpu_path != "default":
        if not out.is_file():
            raise SystemExit(f"{out}: run the default CPU path first")
        record = json.loads(out.read_text())
        record.setdefault("cpu_path_commands", {})[cpu_path] = " ".join(["python", *sys.argv])
        return record

    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "scikit-learn": sklearn.__version__, "python": platform.python_version()}
    print(f"official code: {name} @ {commit}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("changes to run it here:\n  " + "\n  ".join(patches))
    record = {"official": {"repo": name, "commit": commit, "patches": patches, "versions": versions},
              "command": " ".join(["python", *sys.argv]), "fixture": json.loads((fixture / "spec.json").read_text()),
              "shared_flags": shared_flags, "settings": {}}
    if out.is_file():
        old = json.loads(out.read_text())
        record.update({k: old[k] for k in ("settings", "cpu_paths", "cpu_path_commands") if k in old})
    return record


class WeightErrors:
    """Per layer, GPTQ's relative weight error sum ||Q - W||^2 / sum ||W||^2 over its ``per_layer`` linears, fed
    one linear at a time (the official codes quantize them in turn)."""

    def __init__(self, per_layer: int):
        self.per_layer, self.sums = per_layer, []

    def add(self, weight: torch.Tensor, quantized: torch.Tensor) -> None:
        if not self.sums or len(self.sums[-1]) == 2 * self.per_layer:
            self.sums.append([])
        w = weight.float()
        self.sums[-1] += [float((quantized.float() - w).pow(2).sum()), float(w.pow(2).sum())]

    def observe(self, gptq_class) -> None:
        """Record every weight ``gptq_class.fasterquant`` quantizes, before and after (the official GPTQ class,
        wrapped in this process only; the wrapper changes nothing)."""
        fasterquant = gptq_class.fasterquant

        def measured(gptq, *a, **k):
            weight = gptq.layer.weight.data.float().clone()
            fasterquant(gptq, *a, **k)
            self.add(weight, gptq.layer.weight.data)

        gptq_class.fasterquant = measured

    def by_layer(self) -> list[float]:
        return [sum(s[0::2]) / sum(s[1::2]) for s in self.sums]


CPU_PATH_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def add_cpu_path_flag(parser) -> None:
    parser.add_argument("--cpu_path", default="default",
                        help="name of the CPU code path this run uses (e.g. avx2, with ATEN_CPU_CAPABILITY=avx2 "
                             "MKL_ENABLE_INSTRUCTIONS=AVX2 set): other than default, it only adds its perplexities "
                             "to the settings already recorded, as the official figure's spread across machines")


def store(record: dict, name: str, entry: dict, cpu_path: str) -> None:
    """Record one setting's figures: the default path's replace the setting (its other paths' figures kept);
    another path's only add ``ppl_by_cpu_path[cpu_path]``."""
    import os

    old = record["settings"].get(name, {})
    if cpu_path == "default":
        record["settings"][name] = {**entry, **({"ppl_by_cpu_path": old["ppl_by_cpu_path"]}
                                                if "ppl_by_cpu_path" in old else {})}
        return
    if not old:
        raise SystemExit(f"{name}: run the default CPU path first")
    old.setdefault("ppl_by_cpu_path", {})[cpu_path] = entry["ppl"]
    record.setdefault("cpu_paths", {})[cpu_path] = " ".join(f"{v}={os.environ[v]}" for v in CPU_PATH_VARIABLES
                                                            if v in os.environ) or "(no variable set)"


def parser(doc: str, repo: str, out: str) -> argparse.ArgumentParser:
    """The flags every runner takes: the official checkout, the fixture, the record, --only, --cpu_path."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repo", required=True, help=f"a checkout of {repo}")
    ap.add_argument("--fixture", required=True, help="scripts/parity/fixture.py's output directory")
    ap.add_argument("--out", required=True, help=f"the JSON to write ({out})")
    ap.add_argument("--only", default=None, help="comma list of settings (default: all)")
    add_cpu_path_flag(ap)
    return ap


def run_all(args, name: str, settings: dict, measure, *, patches=(), cuda_no_ops=(), ignore=(), notes=(),
            shared_flags=(), modules=(), added=()) -> None:
    """Copy and patch the official code, then for "FP" and every setting (or --only) call
    ``measure(code_dir, model_dir, calibration, evaluation, setting_name, official_flags) -> {"ppl": ..., ...}``
    (official_flags None: the unquantized model), store it with the flags that give its semantics here and write
    the record. ``modules``: the official code's top-level modules, imported afresh for every setting (it keeps
    module-level state)."""
    from safetensors.torch import load_file

    fixture, out = Path(args.fixture), Path(args.out)
    windows = load_file(str(fixture / "windows.safetensors"))
    kind = json.loads((fixture / "spec.json").read_text())["model"]["kind"]
    model_dir = fixture / {"opt": "tiny-opt", "llama": "tiny-llama"}.get(kind, kind)  # fixture.py's model_dir_name
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        code_dir = Path(tmp) / "official"
        applied = copy_with_patches(Path(args.repo), code_dir, patches, cuda_no_ops, ignore, added) + list(notes)
        record = start_record(name, Path(args.repo), applied, fixture, list(shared_flags), out, args.cpu_path)
        if added:
            record["official"]["added"] = {rel: text for rel, text, _ in added}
        for setting in (["FP", *settings] if not args.only else args.only.split(",")):
            theirs, ours = settings.get(setting, (None, []))
            t0 = time.perf_counter()
            entry = measure(code_dir, model_dir, windows["calibration"], windows["evaluation"], setting,
                            theirs)
            print(f"{setting:28s} ppl {entry['ppl']!r}  ({time.perf_counter() - t0:.1f} s)")
            store(record, setting, {"official_flags": theirs or {}, "our_flags": ours, **entry}, args.cpu_path)
            forget(modules)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


# For the rotation codes (QuaRot, SpinQuant): fast_hadamard_transform is a CUDA extension
# (Dao-AILab/fast-hadamard-transform); its hadamard_transform(x, scale) multiplies the last dimension (a power of two
# here) by the Sylvester Hadamard matrix, times scale. This stand-in does the same in torch.
FAST_HADAMARD = '''import torch


def hadamard_transform(x, scale=1.0):
    """x @ H_n.T * scale over the last dimension, H_n the Sylvester Hadamard matrix (n a power of two)."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, "this stand-in handles powers of two only"
    y, h = x.reshape(-1, n), 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * scale).to(x.dtype)
'''


def check_stand_in(matmul_hadU) -> None:
    """The stand-in (imported from the official code's copy) against the official pure-torch Hadamard
    ``matmul_hadU`` (its hadamard_utils), before any run relies on it."""
    import fast_hadamard_transform

    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gap = float((fast_hadamard_transform.hadamard_transform(x, 256 ** -0.5) - matmul_hadU(x)).abs().max())
    if gap > 1e-12:
        raise SystemExit(f"the fast_hadamard_transform stand-in differs from hadamard_utils.matmul_hadU by {gap}")


@torch.no_grad()
def jitter_(model, seed: int) -> None:
    """Move every weight by at most two units in its last place (x (1 + k 2^-22), k in {-1, 0, 1} drawn with
    ``seed``): the same model up to float noise, for the spread that noise alone gives a figure."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.mul_(1 + torch.randint(-1, 2, param.shape, generator=gen).to(param.dtype) * 2.0 ** -22)


def argv(flags: dict) -> list[str]:
    """An official main's command line for ``flags`` (booleans as --flag / --no-flag)."""
    out = []
    for key, value in flags.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", str(value)]
    return out


def seeded_measure(run, seeds: list[int], jitters: list[int], rotated: set[str]):
    """The ``measure`` of run_all for the rotation codes: ``run(code_dir, model_dir, calib, evaluation, flags, seed,
    jitter) -> (ppl, GPTQ weight errors per layer)``. A rotated setting runs once per seed (its figure depends on
    the random rotation's seed); any other quantized setting runs as it is and on the float-noise draws
    ``jitters`` of the weights (jitter_: how far flipped roundings alone move it)."""

    def measure(code_dir, model_dir, calib, evaluation, name, theirs):
        if theirs is None or name not in rotated:
            ppl, errors = run(code_dir, model_dir, calib, evaluation, theirs, seeds[0])
            by_jitter = {str(j): run(code_dir, model_dir, calib, evaluation, theirs, seeds[0], j)[0]
                         for j in (jitters if theirs is not None else [])}
            for j, p in by_jitter.items():
                print(f"{name:28s} jitter {j}: ppl {p!r}")
            return {"ppl": ppl, **({"gptq_weight_error_by_layer": errors} if errors else {}),
                    **({"ppl_by_jitter": by_jitter} if by_jitter else {})}
        by_seed = {}
        for seed in seeds:
            by_seed[str(seed)] = run(code_dir, model_dir, calib, evaluation, theirs, seed)[0]
            print(f"{name:28s} seed {seed}: ppl {by_seed[str(seed)]!r}")
        return {"ppl": by_seed[str(seeds[0])], "ppl_by_rotation_seed": by_seed}

    return measure


def run_seeded(doc: str, name: str, out: str, run, settings: dict, rotated: set[str], **run_all_args) -> None:
    """A rotation code's main: parse the runner's flags (with --seeds and --jitters), measure every setting with
    :func:`seeded_measure` and write the record (:func:`run_all`)."""
    ap = parser(doc, name, out)
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="--seed values to run each rotated setting with (the spread of the official figure)")
    ap.add_argument("--jitters", default="1,2,3,4",
                    help="float-noise draws (jitter_) to rerun each deterministic quantized setting with: how far "
                         "rounding flips alone move its figure (4-bit steps on massive channels are coarse)")
    args = ap.parse_args()
    measure = seeded_measure(run, [int(s) for s in args.seeds.split(",")],
                             [int(s) for s in args.jitters.split(",") if s], rotated)
    run_all(args, name, settings, measure, **run_all_args)


def forget(modules) -> None:
    """Drop the official code's modules so the next import starts from their module-level state again."""
    for mod in [m for m in sys.modules if m.split(".")[0] in modules]:
        del sys.modules[mod]
