"""Rewrite or check the generated blocks of the README and the docs pages: each sits between
`<!-- generated:NAME begin (SOURCE; do not edit) -->` and `<!-- generated:NAME end -->` on the page that declares
it, and is rendered from committed data only (docs/runs/**/results.json, docs/bench/*.txt), so no figure in them
is typed by hand.

    python -m docgen.readme_blocks --write     # rewrite every block of every page in place (atomically)
    python -m docgen.readme_blocks --check     # exit 1 naming each block that differs from its data
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.errors import UserError
from common.provenance import code_digest
from eval.cli import Parser, write_atomic
from docgen.doc_runs import stored_digest
from docgen.readme_data import load_tree
from docgen.readme_diffs import differences_block
from docgen.readme_best import best_block
from docgen.readme_headline import headline_block
from eval.table import render_table

DEMO_RUNS = ("fp16", "w4a4-rptq", "w4a4-per-tensor")  # scripts/demo.sh's runs, in its order
_BLOCK = re.compile(r"<!-- generated:(?P<name>[\w-]+) begin[^\n]*-->\n(?P<body>.*?)<!-- generated:(?P=name) end -->",
                    re.S)


@dataclass(frozen=True)
class Sources:
    """Where the data lives (the repository's docs/ by default; a tmp tree in the tests)."""
    runs: Path = Path("docs/runs")
    bench: Path = Path("docs/bench")


@dataclass(frozen=True)
class Block:
    name: str
    source: str  # what makes its data, named in the begin marker
    render: Callable[[Sources], str]
    page: str = "README.md"  # where it sits, relative to the repository root


def demo_block(src: Sources) -> str:
    """scripts/demo.sh's runs (copied to docs/runs/demo/<name>/results.json) as eval.table renders them."""
    tree = load_tree(src.runs / "demo")
    runs = [tree[name][0] for name in DEMO_RUNS if name in tree]
    if not runs:
        return "No demo runs yet — run `make demo`.\n"
    missing = [name for name in DEMO_RUNS if name not in tree]
    digest = code_digest()
    stale = [name for name in DEMO_RUNS if name in tree and stored_digest(tree[name][0]) != digest]
    text = render_table(runs)
    text += f"\n{', '.join(missing)}: not run (rerun `make demo`).\n" if missing else ""
    return text + (f"\n**Stale:** {', '.join(stale)} made by other quantization code than this checkout's "
                   "(rerun `make demo`).\n" if stale else "")


@dataclass(frozen=True)
class Bench:
    """A benchmark whose printed report the README quotes: the script, its output file, extra flags."""
    script: str
    file: str
    flags: str = ""

    def command(self) -> str:
        return f"python scripts/{self.script} {self.flags}{' ' if self.flags else ''}--out docs/bench/{self.file}"

    def render(self, src: Sources) -> str:
        path = src.bench / self.file
        if not path.is_file():
            return f"Not run yet: `{self.command()}`.\n"
        text = path.read_text().rstrip()
        if not all(line.startswith("|") for line in text.splitlines()):  # a markdown table stays one
            text = f"```\n{text}\n```"
        return f"Output of `{self.command()}` (docs/bench/{self.file}):\n\n{text}\n"


BENCHES = {
    "bench-calibration": Bench("bench_calibration.py", "calibration.txt", "--digest"),
    "bench-memory": Bench("bench_memory.py", "memory.txt"),
    "bench-rotation": Bench("bench_rotation.py", "rotation.txt"),
    "bench-duquant-gptq": Bench("bench_duquant_gptq.py", "duquant_gptq.txt",
                                "--windows 4 --seqlen 128 --layers 2 --digest"),
    "bench-gptqt": Bench("gptqt_synthetic.py", "gptqt_synthetic.txt"),
    "bench-checkpoint": Bench("bench_checkpoint.py", "checkpoint.txt"),
    "bench-flatquant": Bench("bench_flatquant.py", "flatquant.txt"),
    "bench-w4a4-frontier": Bench("w4a4_frontier.py", "w4a4_frontier.txt"),
    "bench-cpu-paths": Bench("cpu_paths.py", "cpu_paths.txt"),
}
BLOCKS = (
    Block("demo", "scripts/demo.sh", demo_block),
    Block("best", "scripts/make_results_doc.sh and scripts/peer/llmcompressor.py", lambda src: best_block(src.runs)),
    Block("headline", "scripts/make_results_doc.sh", lambda src: headline_block(load_tree(src.runs))),
    Block("differences", "scripts/make_results_doc.sh", lambda src: differences_block(load_tree(src.runs)),
          page="docs/methods/rptq.md"),
    *(Block(name, f"scripts/{b.script} --out", b.render, page="docs/benchmarks.md") for name, b in BENCHES.items()),
)
PAGES = tuple(dict.fromkeys(b.page for b in BLOCKS))


def begin_marker(block: Block) -> str:
    return f"<!-- generated:{block.name} begin ({block.source}; do not edit) -->"


def rewrite(text: str, src: Sources, page: str = "README.md") -> tuple[str, list[str]]:
    """(``page``'s text with each of its blocks rendered afresh, the names of the blocks that changed). A block
    the page declares but lacks, or an unknown one in it, is a UserError."""
    blocks = {b.name: b for b in BLOCKS if b.page == page}
    found = [m.group("name") for m in _BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(blocks))
    if unknown:
        raise UserError(f"{page} has generated blocks this command does not know there: {unknown}")
    absent = [name for name in blocks if name not in found]
    if absent:
        raise UserError(f"{page} lacks the generated blocks {absent}; add their begin/end markers")
    changed = []

    def fresh(m: re.Match) -> str:
        block = blocks[m.group("name")]
        body = block.render(src)
        new = f"{begin_marker(block)}\n{body}<!-- generated:{block.name} end -->"
        if new != m.group(0):
            changed.append(block.name)
        return new

    return _BLOCK.sub(fresh, text), changed


def main(argv=None) -> int:
    parser = Parser(prog="python -m docgen.readme_blocks", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 naming each stale block")
    parser.add_argument("--root", default=".", help="the repository root the pages are under (default .)")
    parser.add_argument("--runs", default="docs/runs", help="the results.json tree (default docs/runs)")
    parser.add_argument("--bench", default="docs/bench", help="the benchmarks' output files (default docs/bench)")
    args = parser.parse_args(argv)
    stale = 0
    for page in PAGES:
        path = Path(args.root) / page
        try:
            new, changed = rewrite(path.read_text(), Sources(Path(args.runs), Path(args.bench)), page)
        except OSError as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.check:
            for name in changed:
                print(f"error: {page}: generated block '{name}' differs from its data; run "
                      "python -m docgen.readme_blocks --write", file=sys.stderr)
            stale += len(changed)
            continue
        if changed:
            write_atomic(path, new)
        print(f"{page}: rewrote {', '.join(changed) if changed else 'nothing (all blocks current)'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
