"""The README's generated blocks: they equal what the committed data renders to, they put the right values,
ratios, seed spreads and verdicts on a synthetic docs/runs tree (expected values worked out by hand here), and
no measured-looking figure sits in the README outside them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.errors import UserError
from common.provenance import code_digest
from common.tee import tee_stdout
from docgen import readme_blocks
from docgen.readme_blocks import Sources, demo_block, rewrite
from docgen.readme_data import load_tree
from docgen.readme_diffs import differences_block
from docgen.readme_headline import headline_block

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def write_run(root: Path, key: str, ppl: dict, wbits=4, abits=4, seed=2, transforms=("reorder",), **extra):
    cfg = {"wbits": wbits, "abits": abits, "seed": seed, "calib_dataset": "ptb", "nsamples": 8, "seqlen": 512,
           "limit": 4, "method": extra.pop("method", "rptq")}
    cfg.update(extra.pop("config", {}))
    run = {"model": "smollm2-135m", "config": cfg, "method": {"name": cfg["method"], "transforms": list(transforms)},
           "ppl": ppl, "timing": {"calibration_s": 12.0, "eval_s": 3.0}, **extra}
    path = root / key / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(run))


def rows(block: str) -> dict[str, list[str]]:
    """A rendered markdown table as {first cell: the other cells}."""
    out = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[cells[0]] = cells[1:]
    return out


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "ppl/FP16", {"ptb": 50.0, "wiki_leads": 10.0}, wbits=16, abits=16)
    write_run(root, "methods/W8A8-smoothquant-per-token", {"ptb": 50.5, "wiki_leads": 10.1}, 8, 8,
              method="smoothquant")
    write_run(root, "methods/W4A8-fptq", {"ptb": 53.0, "wiki_leads": 10.4}, 4, 8, method="fptq")
    write_run(root, "ppl/W4A8", {"ptb": 52.0, "wiki_leads": 10.6}, 4, 8)
    # three calibration seeds of the default W4A4 row: mean 110, sample std 10
    layer_errors = [{"layer": 0, "points": {"down_in": 0.1, "o_in": 0.03, "qkv_in": 0.01}},
                    {"layer": 1, "points": {"down_in": 0.2, "o_in": 0.05, "qkv_in": 0.01}}]
    write_run(root, "ppl/W4A4", {"ptb": 100.0, "wiki_leads": 20.0}, layer_errors=layer_errors)
    write_run(root, "ppl/W4A4-seed3", {"ptb": 110.0, "wiki_leads": 20.0}, seed=3)
    write_run(root, "ppl/W4A4-seed4", {"ptb": 120.0, "wiki_leads": 20.0}, seed=4)
    write_run(root, "methods/W4A4-duquant", {"ptb": 70.0, "wiki_leads": 14.0}, method="duquant",
              transforms=("smooth", "rotate", "qk_rotate"), config={"rotation": {"kind": "duquant", "steps": 64}})
    write_run(root, "weights/W2-gptq", {"ptb": 400.0, "wiki_leads": 80.0}, 2, 16)
    write_run(root, "weights/W2-gptqt", {"ptb": 150.0, "wiki_leads": 30.0}, 2, 16)
    write_run(root, "weights/W3-gptq", {"ptb": 60.0, "wiki_leads": 12.0}, 3, 16)
    write_run(root, "weights/W3-gptqt", {"ptb": 61.0, "wiki_leads": 11.0}, 3, 16)
    write_run(root, "diffs/W4A4-grid-full", {"ptb": 99.0})
    write_run(root, "diffs/W4A4-a-dynamic", {"ptb": 120.0}, config={"a_dynamic": True})
    write_run(root, "diffs/W4A4-a-dynamic-per-token", {"ptb": 90.0}, config={"a_dynamic": True})
    return root


def test_generated_blocks_match_the_committed_data():
    """The check: every block of the README and the docs pages is exactly what docs/runs and docs/bench render
    to."""
    assert "README.md" in readme_blocks.PAGES and "docs/benchmarks.md" in readme_blocks.PAGES
    for page in readme_blocks.PAGES:
        text = (ROOT / page).read_text()
        new, changed = rewrite(text, Sources(ROOT / "docs/runs", ROOT / "docs/bench"), page)
        assert changed == [], f"{page}: stale blocks {changed}: run python -m docgen.readme_blocks --write"
        assert new == text


def test_headline_values_ratios_seeds_and_verdicts(tree):
    block = headline_block(load_tree(tree))
    got = rows(block)
    assert "FP16 50.00 / 10.00" in block and "8 windows × 512 tokens of ptb train, seed 2, 3, 4" in block
    # 50.5/50 = 1.01, 10.1/10 = 1.01: within 2% on both sets
    assert got["W8A8 SmoothQuant, per-token dynamic"] == ["50.50 (×1.01)", "10.10 (×1.01)",
                                                          "within 2% of FP16: met"]
    # 53/50 = 1.06 > 1.05, and 53 > RPTQ W4A8's 52 on PTB
    assert got["W4A8 FPTQ"][2] == ("within 5% of FP16: **missed**; below RPTQ W4A8: **missed** (spread not measured: "
                                   "one seed)")
    # mean(100, 110, 120) = 110, stdev = 10, 110/50 = 2.20; wiki_leads 20 ± 0 over 3 seeds
    assert got["W4A4 RPTQ"][:2] == ["110.00 ± 10.00 (×2.20; 3 seeds)", "20.00 ± 0.00 (×2.00; 3 seeds)"]
    # 70/50 = 1.40 ≤ 1.5; its second target's reference row did not run; the label carries the run's steps
    assert got["W4A4 DuQuant (64 greedy steps)"] == [
        "70.00 (×1.40)", "14.00 (×1.40)", "≤ 1.5× FP16: met; below RPTQ W4A4 uniform: RPTQ W4A4 uniform not run"]
    # 150 ≤ 0.5 × 400 and 30 ≤ 0.5 × 80; at 3 bits GPTQT is above GPTQ on PTB (61 > 60)
    assert got["W2A16 GPTQT (per row)"][2] == "at most 0.5× GPTQ 2-bit: met"
    assert got["W3A16 GPTQT (per row)"][2] == "below GPTQ 3-bit: **missed** (spread not measured: one seed)"
    assert got["W4A4 QuaRot"] == ["not run", "not run", ""]
    assert got["W8A8 SmoothQuant, per-tensor static (preset default)"][:2] == ["not run", "not run"]
    assert "No runs yet" not in block


def test_below_another_row_is_judged_by_the_spread_over_seeds(tmp_path):
    """"below X" compares two seed-dependent rows: met or missed only when the gap exceeds 2 × the larger std."""
    root = tmp_path / "runs"
    write_run(root, "ppl/FP16", {"ptb": 50.0, "wiki_leads": 10.0}, wbits=16, abits=16)
    for seed, (uni, duq) in zip((2, 3, 4), ((100.0, 90.0), (104.0, 91.0), (108.0, 92.0))):
        tail = "" if seed == 2 else f"-seed{seed}"
        # uniform: ptb 104 ± 4, wiki 20 ± 1; DuQuant: ptb 91 ± 1 (gap 13 > 2 × 4), wiki 19 ± 1 (gap 1 ≤ 2 × 1)
        write_run(root, f"ppl/W4A4-uniform{tail}", {"ptb": uni, "wiki_leads": 19.0 + seed - 2}, seed=seed)
        write_run(root, f"methods/W4A4-duquant{tail}", {"ptb": duq, "wiki_leads": 18.0 + seed - 2}, seed=seed,
                  method="duquant", transforms=("smooth", "rotate"))
    got = rows(headline_block(load_tree(root)))["W4A4 DuQuant"][2]
    assert got.endswith("below RPTQ W4A4 uniform: not distinguishable on wiki_leads (|Δ| ≤ 2 × the larger std over "
                        "seeds)")
    # a clear gap on both sets: met; the same gap the other way: missed
    for seed, v in zip((2, 3, 4), (20.0, 21.0, 22.0)):
        tail = "" if seed == 2 else f"-seed{seed}"
        path = root / f"ppl/W4A4-uniform{tail}/results.json"
        run = json.loads(path.read_text())
        run["ppl"]["wiki_leads"] = v + 10
        path.write_text(json.dumps(run))
    assert rows(headline_block(load_tree(root)))["W4A4 DuQuant"][2].endswith("below RPTQ W4A4 uniform: met")
    for seed in (2, 3, 4):
        path = root / f"ppl/W4A4-uniform{'' if seed == 2 else f'-seed{seed}'}/results.json"
        run = json.loads(path.read_text())
        run["ppl"] = {"ptb": 60.0 + seed, "wiki_leads": 10.0 + seed / 10}
        path.write_text(json.dumps(run))
    assert rows(headline_block(load_tree(root)))["W4A4 DuQuant"][2].endswith("below RPTQ W4A4 uniform: **missed**")


def test_differences_measured_column(tree):
    block = differences_block(load_tree(tree))
    got = rows(block)
    # grid-full: 99 against the W4A4 seeds' mean 110 -> ×0.90; W4A3KV not run
    assert got["integer grid"][2] == "W4A4 110.00 ± 10.00 (3 seeds) → 99.00 (×0.90); W4A3KV not run"
    # per-token dynamic compares with the reference's dynamic ranges: 90 / 120 = 0.75
    assert got["`--a_dynamic`"][2] == "W4A4 120.00 → 90.00 (×0.75); W4A3KV not run"
    assert got["weight ranges"][2] == "W4A4 not run; W4A3KV not run"
    assert got["softmax P"][2] == "W4A4 not run; W4A3KV not run"
    # mean over the two layers: down_in 0.15, o_in 0.04
    assert "`down_in` (1.5e-01), next `o_in` (4.0e-02)" in block


def test_demo_block_from_its_runs(tmp_path):
    root = tmp_path / "runs"
    assert demo_block(Sources(root, tmp_path)) == "No demo runs yet — run `make demo`.\n"
    write_run(root, "demo/fp16", {"ptb": 50.14}, 16, 16)
    write_run(root, "demo/w4a4-rptq", {"ptb": 101.79})
    block = demo_block(Sources(root, tmp_path))
    got = rows(block)
    assert got["FP16"] == ["50.14", "12.0", "3.0"]
    assert next(v for k, v in got.items() if k.startswith("W4A4")) == ["101.79", "12.0", "3.0"]
    assert "w4a4-per-tensor: not run" in block
    assert "**Stale:** fp16, w4a4-rptq made by other quantization code" in block  # no code digest recorded


def test_demo_block_names_only_the_runs_other_code_made(tmp_path):
    root = tmp_path / "runs"
    current = {"versions": {"code_digest": code_digest()}}
    write_run(root, "demo/fp16", {"ptb": 50.14}, 16, 16, **current)
    write_run(root, "demo/w4a4-rptq", {"ptb": 101.79}, **current)
    write_run(root, "demo/w4a4-per-tensor", {"ptb": 900.0}, versions={"code_digest": "0123456789abcdef"})
    block = demo_block(Sources(root, tmp_path))
    assert "**Stale:** w4a4-per-tensor made by" in block and "not run" not in block


def test_empty_tree_says_so(tmp_path):
    tree = load_tree(tmp_path / "nothing")
    block = headline_block(tree)
    assert block.startswith("No runs yet — run `scripts/make_results_doc.sh`")
    assert all(cells[:2] == ["not run", "not run"] for cells in rows(block).values() if cells[0] != "PTB")
    assert rows(differences_block(tree))["k-means features"][2] == "W4A4 not run; W4A3KV not run"


def test_check_names_the_stale_block_and_write_fixes_it(tree, tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "memory.txt").write_text("peak RSS 1.23 GiB\n")
    for page in readme_blocks.PAGES:  # each page holding its own blocks, all stale
        path = tmp_path / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(f"<!-- generated:{b.name} begin (x) -->\nold\n<!-- generated:{b.name} end -->"
                                   for b in readme_blocks.BLOCKS if b.page == page) + "\n")
    args = ["--root", str(tmp_path), "--runs", str(tree), "--bench", str(bench)]
    assert readme_blocks.main(["--check", *args]) == 1
    err = capsys.readouterr().err
    assert "README.md: generated block 'headline' differs" in err
    assert "docs/benchmarks.md: generated block 'bench-memory' differs" in err
    assert readme_blocks.main(["--write", *args]) == 0
    assert readme_blocks.main(["--check", *args]) == 0
    text = (tmp_path / "docs/benchmarks.md").read_text()
    assert "```\npeak RSS 1.23 GiB\n```" in text
    assert "Not run yet: `python scripts/bench_rotation.py --out docs/bench/rotation.txt`" in text
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "<!-- generated:mystery begin (x) -->\n<!-- generated:mystery end -->\n")
    with pytest.raises(UserError, match="mystery"):
        rewrite(readme.read_text(), Sources(tree, bench))
    with pytest.raises(UserError, match="bench-memory"):  # a block declared on another page is unknown here
        rewrite(readme.read_text().replace("mystery", "bench-memory"), Sources(tree, bench))


def test_tee_writes_only_a_finished_report(tmp_path, capsys):
    out = tmp_path / "bench" / "report.txt"
    with tee_stdout(out):
        print("ratio 1.18x")
    assert out.read_text() == "ratio 1.18x\n" and capsys.readouterr().out == "ratio 1.18x\n"
    with pytest.raises(RuntimeError), tee_stdout(out):
        print("half")
        raise RuntimeError
    assert out.read_text() == "ratio 1.18x\n"


# Decimals that are not measurements, each with why: an arXiv id, versions (Python, torch, compressed-tensors,
# llmcompressor, transformers), settings (EMA momentum, percdamp and DuQuant's smoothing floor, QuaRot's K/V
# clip), sf8's rounding bound (1/16, arithmetic) and the learned clipping factors' start (sigmoid(4), arithmetic).
ALLOWED = (r"arXiv \d{4}\.\d{5}", r"abs/\d{4}\.\d{5}", r"Python 3\.11", r"torch==\d+\.\d+\.\d+",
           r"library itself \(0\.19", r"llmcompressor 0\.14", r"transformers 5\.23", r"compressed-tensors 0\.19",
           r"momentum 0\.99", r"--percdamp 0\.01", r"floor 0\.01", r"clip 0\.95", r"<= 6\.25%",
           r"factors start at 0\.982")


def test_no_hand_typed_figures_outside_generated_blocks():
    """A decimal with two or more fractional digits outside the generated blocks and code is taken for a
    hand-typed measurement (crude on purpose: a new legitimate one joins ALLOWED with its reason)."""
    text = re.sub(r"<!-- generated:([\w-]+) begin.*?<!-- generated:\1 end -->", "", README.read_text(), flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found = []
    for line in text.splitlines():
        if line.startswith("    "):  # an indented code block: commands, not figures
            continue
        for allowed in ALLOWED:
            line = re.sub(allowed, "", line)
        found += re.findall(r"(?<![\w.])\d+\.\d{2,}", line)
    assert found == []
