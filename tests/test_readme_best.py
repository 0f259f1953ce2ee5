"""The README's best-per-setting block and the results doc's llm-compressor section, on synthetic runs trees
(two models, the peer's runs beside ours), with the expected values worked out by hand here."""
from __future__ import annotations

import json
from pathlib import Path

from docgen.peer_runs import best_peer, load_peer, peer_section
from docgen.readme_best import best_block, setting_of
from docgen.readme_data import load_tree
from tests.test_readme_blocks import rows, write_run


def write_peer(root: Path, name: str, setting: str, ppl: dict, seed: int = 2, compared_with: str = "",
               diagnostic: bool = False):
    path = root / "peer" / (name if seed == 2 else f"{name}-seed{seed}") / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"peer": "llm-compressor", "recipe": name, "seed": seed, "setting": setting,
                                "ppl": ppl, "description": f"{name} recipe", "compared_with": compared_with,
                                "versions": {"llmcompressor": "0.14.0.1"}, "diagnostic": diagnostic}))


def two_models(tmp_path: Path) -> Path:
    small = tmp_path / "docs" / "runs"
    write_run(small, "ppl/FP16", {"ptb": 50.0, "wiki_leads": 10.0}, wbits=16, abits=16)
    # W4A4: three seeds of 70, 80, 90 (mean 80, std 10) beat one seed of 85; a diffs run at 60 is no candidate
    for seed, v in zip((2, 3, 4), (70.0, 80.0, 90.0)):
        write_run(small, "methods/W4A4-a" + ("" if seed == 2 else f"-seed{seed}"), {"ptb": v, "wiki_leads": 20.0},
                  seed=seed)
    write_run(small, "methods/W4A4-b", {"ptb": 85.0, "wiki_leads": 15.0})
    write_run(small, "diffs/W4A4-grid-full", {"ptb": 60.0})
    write_run(small, "ppl/W4A4KV", {"ptb": 51.0, "wiki_leads": 10.5}, config={"only_quant_kv": True})
    # W4A8: the best run has one seed
    write_run(small, "methods/W4A8-x", {"ptb": 55.0, "wiki_leads": 11.0}, abits=8)
    write_run(small, "ppl/W4A8", {"ptb": 56.0, "wiki_leads": 11.5}, abits=8)
    write_peer(small, "W4A4-spin", "W4A4", {"ptb": 100.0, "wiki_leads": 30.0}, compared_with="methods/W4A4-a")
    write_peer(small, "W4A4-spin", "W4A4", {"ptb": 110.0, "wiki_leads": 30.0}, seed=3)
    write_peer(small, "W4A4-quip", "W4A4", {"ptb": 120.0, "wiki_leads": 25.0})
    # lower than every recipe, but a diagnostic (a default switched off): never the peer's best
    write_peer(small, "W4A4-spin-no-x", "W4A4", {"ptb": 90.0, "wiki_leads": 25.0}, diagnostic=True)
    gemma = tmp_path / "docs" / "runs-gemma3-270m"
    write_run(gemma, "ppl/FP16", {"ptb": 40.0, "wiki_leads": 8.0}, wbits=16, abits=16)
    write_run(gemma, "ppl/W4A4", {"ptb": 60.0, "wiki_leads": 12.0})
    return small


def test_best_per_setting_over_both_models_and_the_peer(tmp_path):
    small = two_models(tmp_path)
    lines = [line for line in best_block(small).splitlines() if line.startswith("| W")]
    got = {tuple(c.strip() for c in line.strip("|").split(" | ")[:2]): line.strip("|").split(" | ")[2:]
           for line in lines}
    got = {k: [c.strip() for c in v] for k, v in got.items()}
    # mean 80 < 85: the three-seed run wins; 80/50 = 1.60, 20/10 = 2.00; the peer's best is spin: mean 105, std 7.07
    assert got[("W4A4", "SmolLM2-135M")] == ["`methods/W4A4-a` (stale)", "80.00 ± 10.00 (×1.60; 3 seeds)",
                                             "20.00 ± 0.00 (×2.00; 3 seeds)", "W4A4-spin",
                                             "105.00 ± 7.07 (×2.10; 2 seeds)", "30.00 ± 0.00 (×3.00; 2 seeds)"]
    assert got[("W4A8", "SmolLM2-135M")][0] == "`methods/W4A8-x` (1 seed of 3, stale)"
    assert got[("W4A4", "Gemma 3 270M")][:3] == ["`ppl/W4A4` (1 seed of 3, stale)", "60.00 (×1.50)", "12.00 (×1.50)"]
    assert got[("W4A4", "Gemma 3 270M")][3:] == ["not run"] * 3
    assert got[("W8A8", "Gemma 3 270M")] == ["not run"] * 6
    assert "fewer than 3 seeds is not yet confirmed" in best_block(small)


def test_kv_only_and_fp_runs_have_no_setting():
    assert setting_of({"config": {"wbits": 4, "abits": 4, "only_quant_kv": True}}) is None
    assert setting_of({"config": {"wbits": 16, "abits": 16}}) is None
    assert setting_of({"config": {"wbits": 8, "abits": 8}}) == "W8A8"


def test_the_peer_runs_stay_out_of_our_tree_and_its_section_pairs_rows(tmp_path):
    small = two_models(tmp_path)
    tree = load_tree(small)
    assert not any(k.startswith("peer/") for k in tree)
    peer = load_peer(small)
    assert [len(peer[n]) for n in ("W4A4-spin", "W4A4-quip", "W4A4-spin-no-x")] == [2, 1, 1]
    assert best_peer(peer, "W4A4")[0] == "W4A4-spin" and best_peer(peer, "W8A8") is None
    got = rows("\n".join(peer_section(small, tree)))
    # spin beside methods/W4A4-a (80 ± 10 over 3 seeds); quip names no row of ours
    assert got["W4A4-spin: W4A4-spin recipe"][1:] == ["105.00 ± 7.07 (×2.10; 2 seeds)",
                                                      "30.00 ± 0.00 (×3.00; 2 seeds)", "`methods/W4A4-a`",
                                                      "80.00 ± 10.00 (×1.60; 3 seeds)", "20.00 ± 0.00 (×2.00; 3 seeds)"]
    assert got["W4A4-quip: W4A4-quip recipe"][4:] == ["not run", "not run"]
    assert peer_section(tmp_path / "none", {})[0].startswith("Not run yet")
