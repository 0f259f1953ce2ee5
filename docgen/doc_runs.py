"""docs/runs, the data of docs/results.md: one directory per run, its results.json (stripped small) and the
command that produced it; the rule by which scripts/make_results_doc.sh skips a run; reading the tree back.

    docs/runs/<section>/<run>/command.txt          `main.py MODEL flags...` (no interpreter, no --output_path)
    docs/runs/<section>/<run>/results.json         the run's results.json, stripped (under MAX_BYTES)
    docs/runs/<section>/<run>/plots/data/*.safetensors   plot data, only for runs a figure draws
    docs/runs/plan.tsv                             the script's plan: tier, sections, run, command
    docs/runs/steps.tsv                            one line per run executed: run, wall s, finished at, threads, jobs,
                                                   CPU model (the 6th column, since issue 34)
    docs/runs/machines.txt                         the machines that ran the script (one line each)

A run is current (skipped) when its results.json exists, command.txt equals the planned command byte for byte,
and results.json's versions.code_digest equals the working tree's common.provenance.code_digest(); a run asked to
plot (--act_dist_plot) must also hold its plot data (a run resumed past the plotted layer has none).

    python -m docgen.doc_runs current RUNS DIGEST < plan   prints the runs of the plan (run TAB command) that are current
    python -m docgen.doc_runs store SRC DEST COMMAND      copies the finished run SRC (an --output_path) into DEST
    python -m docgen.doc_runs machine                     prints the machine's line for docs/runs/machines.txt
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from common.atomic import atomic_write, atomic_write_text
from common.errors import UserError
from eval.runs import load_runs

SECTIONS = ("ppl", "methods", "weights", "diffs", "tasks", "ref")
EXTRA_SEEDS = (3, 4)  # the base run is seed 2 (the script's --seed)
MAX_BYTES = 200_000
_SEED = re.compile(r"^(.*)-seed(\d+)$")


def seed_key(key: str, seed: int) -> str:
    return f"{key}-seed{seed}"


def base_key(key: str) -> str:
    """The run a seed variant repeats ("ppl/W4A4-seed3" -> "ppl/W4A4"); other keys unchanged."""
    match = _SEED.match(key)
    return match.group(1) if match else key


def strip(results: dict) -> dict:
    """results.json as docs/runs keeps it: no local paths; the rewrite records of placements go first when the
    record is over MAX_BYTES (nothing in the document reads them). Raises UserError when still too big."""
    out = {k: v for k, v in results.items() if not k.startswith("_") and k not in ("checkpoint", "export")}
    if len(dump(out)) > MAX_BYTES:
        out["decisions"] = [{k: v for k, v in d.items() if k != "placements"} for d in out.get("decisions") or []]
    size = len(dump(out))
    if size > MAX_BYTES:
        raise UserError(f"results.json of {out.get('model')} is {size} bytes stripped, over docs/runs' "
                        f"{MAX_BYTES}; drop a bulky field in docgen/doc_runs.strip")
    return out


def dump(results: dict) -> str:
    # Sorted keys, one-space indent: a stored run diffs line by line and reads the same on every machine.
    return json.dumps(results, indent=1, sort_keys=True) + "\n"


def store(src: Path, dest: Path, command: str) -> None:
    """Copy the finished run in `src` into `dest`: results.json is removed first and written last, so an
    interrupted copy leaves no results.json that the skip rule could take for current."""
    results = json.loads((Path(src) / "results.json").read_text())
    dest = Path(dest)
    (dest / "results.json").unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / "plots").exists():
        shutil.rmtree(dest / "plots")  # an earlier version's plot data
    plots = results.get("plots") or {}
    for rel in plots.get("data") or []:  # relative to OUTPUT_PATH (eval.plot_data)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp, s=Path(src) / rel: shutil.copyfile(s, tmp))
    atomic_write_text(dest / "command.txt", command.strip() + "\n")
    atomic_write_text(dest / "results.json", dump(strip(results)))


def stored_digest(run: dict) -> str | None:
    return (run.get("versions") or {}).get("code_digest")


def is_current(dest: Path, command: str, digest: str) -> bool:
    """The skip rule: results.json present, same command, same code digest."""
    dest = Path(dest)
    try:
        run = json.loads((dest / "results.json").read_text())
        stored = (dest / "command.txt").read_text().strip()
    except (OSError, ValueError):
        return False
    if "--act_dist_plot" in command.split() and not (run.get("plots") or {}).get("data"):
        return False  # resumed past the plotted layer (main.py keeps no ranges of it): the figure needs a clean run
    return stored == command.strip() and stored_digest(run) == digest


def read_plan(root: Path) -> list[tuple[int, str, str, str]]:
    """(tier, sections, run, command) per line of root/plan.tsv in the script's order; [] when absent."""
    path = Path(root) / "plan.tsv"
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [(int(r[0]), r[1], r[2], r[3]) for r in rows if len(r) == 4]


def load_tree(root: Path) -> dict[str, dict]:
    """Every stored run under root, keyed "section/run", each with "_path" and "_command" (its command.txt)."""
    runs = {}
    for section in SECTIONS:
        for path in sorted((Path(root) / section).glob("*/results.json")):
            run = load_runs(path)[0]
            cmd = path.parent / "command.txt"
            run["_command"] = cmd.read_text().strip() if cmd.is_file() else None
            runs[f"{section}/{path.parent.name}"] = run
    return runs


def read_steps(root: Path) -> dict[str, tuple[int, str, str, str]]:
    """steps.tsv: per run its last (wall s, finished at, threads, parallel runs); a rerun replaces the entry."""
    path, out = Path(root) / "steps.tsv", {}
    for row in (ln.split("\t") for ln in (path.read_text().splitlines() if path.is_file() else []) if ln.strip()):
        row += [""] * (5 - len(row))
        out[row[0]] = (int(row[1]), row[2], row[3] or "unset", row[4] or "1")
    return out


def read_step_machines(root: Path) -> dict[str, str]:
    """steps.tsv's sixth column: the CPU each run's last execution ran on (absent in lines written before it)."""
    path, out = Path(root) / "steps.tsv", {}
    for row in (ln.split("\t") for ln in (path.read_text().splitlines() if path.is_file() else []) if ln.strip()):
        out[row[0]] = row[5] if len(row) > 5 and row[5] else "–"
    return out


def machine_lines() -> list[str]:
    """The machine running the script, one markdown line each (the script keeps them in docs/runs/machines.txt)."""
    # Deliberately lazy: torch takes about 7 s to import on the 2-core dev box; only this probe needs it.
    import os
    import platform

    import torch

    cpu = ram = "unknown"
    try:  # Linux only
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        ram = f"{next(int(ln.split()[1]) for ln in open('/proc/meminfo') if ln.startswith('MemTotal')) / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return [f"- CPU: {cpu}; `nproc` = {len(os.sched_getaffinity(0))}; RAM {ram}; torch.cuda.is_available() = "
            f"{torch.cuda.is_available()}; OS: {platform.platform()}; Python {platform.python_version()}"]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["current"] and len(args) == 3:
            root, digest = Path(args[1]), args[2]
            for line in sys.stdin.read().splitlines():
                key, _, command = line.partition("\t")
                if key and is_current(root / key, command, digest):
                    print(key)
            return 0
        if args[:1] == ["machine"] and len(args) == 1:
            print("\n".join(machine_lines()))
            return 0
        if args[:1] == ["store"] and len(args) == 4:
            store(Path(args[1]), Path(args[2]), args[3])
            return 0
    except (UserError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("usage: python -m docgen.doc_runs current RUNS DIGEST < plan | store SRC DEST COMMAND | machine",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
