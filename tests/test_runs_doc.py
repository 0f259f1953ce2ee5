"""docs/runs as the data of docs/results.md (issue #23): the stored runs, the skip rule, mean ± std over
seeds, the 2× spread rule, stale runs, the commit range, runs not run yet, a byte-identical rerender, and
the script's plan. Everything on synthetic results.json files written here with known numbers."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from statistics import mean, stdev

from docgen import doc_runs, results_doc
from docgen.doc_plan import SECTION_RUNS, SEEDED, all_runs
from docgen.doc_stats import Spread, compare
from tests.test_results_doc import fake_run

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_results_doc.sh"
DIGEST = "d1g35t0000000000"
PTB = {  # run: ptb perplexity per seed (2, 3, 4); wiki_leads is ptb / 5
    "ppl/W4A4": (100.0, 104.0, 109.0),
    "methods/W4A4-duquant": (106.0, 107.5, 108.0),  # mean within 2 x the larger std of W4A4's: not different
    "methods/W4A4-rotation": (130.0, 131.0, 133.0),  # far above duquant's: different
}


def _run(key: str, ptb: float, seed: int = 2, git: str = "aaa1111", digest: str = DIGEST, **cfg) -> dict:
    w, a = (16, 16) if key.endswith("FP16") else (4, 4)
    run = fake_run(w, a, ppl={"ptb": ptb, "wiki_leads": ptb / 5}, seed=seed, **({"limit": 40, "nsamples": 32} | cfg))
    run["versions"] = {"git": git, "code_digest": digest, "torch": "2", "transformers": "5", "lm_eval": "0.4"}
    return run


def _tree(root: Path, runs: dict[str, dict], plan: dict[str, str] | None = None, steps: list[str] = ()) -> None:
    for key, run in runs.items():
        (root / key).mkdir(parents=True, exist_ok=True)
        (root / key / "command.txt").write_text(f"main.py m {key}\n")
        (root / key / "results.json").write_text(doc_runs.dump(run))
    if plan is not None:
        (root / "plan.tsv").write_text("".join(f"1\tmethods\t{k}\t{c}\n" for k, c in plan.items()))
    (root / "steps.tsv").write_text("".join(line + "\n" for line in steps))
    (root / "machines.txt").write_text("- CPU: test\n")


def _seeded_runs() -> dict[str, dict]:
    runs = {"ppl/FP16": _run("ppl/FP16", 50.0, calib_s=0.0), "ppl/W4A4-per-tensor": _run("x", 900.0, reorder=""),
            "methods/W4A4-quarot": _run("x", 90.0, git="bbb2222")}
    for key, values in PTB.items():
        for seed, ptb in zip((2, 3, 4), values):
            runs[key if seed == 2 else f"{key}-seed{seed}"] = _run(key, ptb, seed=seed)
    runs["methods/W4A4-rotation-seed4"]["versions"]["code_digest"] = "0ld0000000000000"
    return runs


def _render(tmp_path: Path, runs: dict[str, dict], **kw) -> str:
    root, doc = tmp_path / "runs", tmp_path / "doc" / "results.md"
    _tree(root, runs, **kw)
    assert results_doc.main(["--runs", str(root), "--doc", str(doc), "--model", "tiny", "--code-digest", DIGEST]) == 0
    return doc.read_text()


def _rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")]
                                             for ln in text.splitlines() if ln.startswith("| "))}


def test_methods_table_shows_mean_and_std_over_seeds_computed_by_hand(tmp_path):
    rows = _rows(_render(tmp_path, _seeded_runs()))
    for label, key in (("W4A4 RPTQ", "ppl/W4A4"), ("W4A4 DuQuant", "methods/W4A4-duquant")):
        ptb = PTB[key]
        wiki = [v / 5 for v in ptb]
        assert rows[label][:6] == [f"{mean(ptb):.2f} ± {stdev(ptb):.2f}", f"×{mean(ptb) / 50.0:.2f}",
                                   f"{mean(wiki):.2f} ± {stdev(wiki):.2f}", f"×{mean(wiki) / 10.0:.2f}", "2, 3, 4",
                                   "5"]
    assert rows["W4A4 QuaRot (GPTQ weights)"][:2] == ["90.00 (1 seed)", "×1.80"]
    assert rows["FP16"][:2] == ["50.00", "×1.00"]  # nothing calibrated: no seed marker
    assert rows["W4A4-spinquant SpinQuant"][:5] == ["not run", "–", "not run", "–", "–"]
    assert rows["W4A4-spinquant SpinQuant"][-1] == "not run"


def test_rows_are_called_different_only_beyond_twice_the_larger_spread(tmp_path):
    text = _render(tmp_path, _seeded_runs())
    line = next(ln for ln in text.splitlines() if ln.startswith("- W4A4 ptb perplexity, lowest first:"))
    w4a4, duq, rot = (Spread(mean(v), stdev(v), 3) for v in PTB.values())
    larger = max(w4a4.std, duq.std)
    assert abs(w4a4.mean - duq.mean) <= 2 * larger  # the fixture's premise
    assert (f"W4A4 DuQuant {duq.mean:.2f} ± {duq.std:.2f} (not different from W4A4 RPTQ: |Δ| "
            f"{abs(duq.mean - w4a4.mean):.2f} ≤ 2 × {larger:.2f})") in line
    assert abs(rot.mean - duq.mean) > 2 * max(rot.std, duq.std)
    assert (f"W4A4 plain block-Hadamard rotation {rot.mean:.2f} ± {rot.std:.2f} (higher than W4A4 DuQuant: |Δ| "
            f"{rot.mean - duq.mean:.2f} > 2 × {max(rot.std, duq.std):.2f})") in line
    assert line.index("QuaRot") < line.index("W4A4 RPTQ") < line.index("DuQuant") < line.index("rotation")
    # the rule itself: equal gaps, judged by the larger std; one seed on both sides is not judged
    assert compare(Spread(10.0, 1.0, 3), Spread(12.5, 1.0, 3))[0] is True
    assert compare(Spread(10.0, 1.0, 3), Spread(12.5, 1.5, 3))[0] is False
    assert compare(Spread(10.0, None, 1), Spread(50.0, None, 1))[0] is None
    # one seed against a row the seed leaves unchanged (std 0): no spread to judge the single run by
    assert compare(Spread(10.0, 0.0, 3), Spread(12.5, None, 1))[0] is None
    assert compare(Spread(10.0, 0.5, 3), Spread(12.5, None, 1))[0] is True
    assert compare(Spread(10.0, 0.0, 3), Spread(12.5, 0.0, 3))[0] is True  # both exact: any gap is real


def test_header_states_commit_range_stale_runs_and_runs_not_run(tmp_path):
    steps = ["methods/W4A4-quarot\t70\t2026-01-02T00:00:00Z\t1\t2", "ppl/W4A4\t60\t2026-01-01T00:00:00Z\t1\t2"]
    text = _render(tmp_path, _seeded_runs(), steps=steps)
    n = len(_seeded_runs())
    assert f"- Runs: {n} stored of {len(all_runs())} planned, from commits `aaa1111` … `bbb2222`" in text
    assert "runs per commit: `aaa1111` 11, `bbb2222` 1)" in text
    assert ("- **Stale** (1; produced by other code or another command, rerun the script to refresh): "
            "methods/W4A4-rotation-seed4 (code digest 0ld0000000000000).") in text
    not_run = next(ln for ln in text.splitlines() if ln.startswith("- Not run yet ("))
    assert not_run.startswith(f"- Not run yet ({len(all_runs()) - n}): ")
    assert "weights/W2-bcq" in not_run and "methods/W4A4-spinquant" in not_run and "ppl/W4A4," not in not_run
    assert "| ppl/W4A4 | 5.0 | 1.0 | 60 | 1 | 2 |" in text  # wall time from steps.tsv
    assert "| all | 12 | 0.02 | 0.00 | 0.04 |" in text  # budget: 12 runs, 11 x 5 s calib, 130 s process


def test_a_run_whose_command_differs_from_the_plan_is_stale_and_not_shown(tmp_path):
    runs = _seeded_runs()
    plan = {k: f"main.py m {k}" for k in runs} | {"methods/W4A4-quarot": "main.py m --nsamples 64"}
    text = _render(tmp_path, runs, plan=plan)
    assert "methods/W4A4-quarot (command differs from the plan)" in text
    assert _rows(text)["W4A4-quarot QuaRot (GPTQ weights)"][0] == "not run"
    assert f"- Runs: {len(runs) - 1} stored of {len(plan)} planned" in text


def test_rerendering_unchanged_runs_is_byte_identical(tmp_path):
    runs = _seeded_runs() | {"ref/fp16-5x512": _run("ref/FP16", 63.25, limit=5)}
    first = _render(tmp_path, runs).encode()
    doc = tmp_path / "doc" / "results.md"
    assert results_doc.main(["--runs", str(tmp_path / "runs"), "--doc", str(doc), "--model", "tiny",
                             "--code-digest", DIGEST]) == 0
    assert doc.read_bytes() == first and b"<!-- fp16_ptb_ppl_5x512: 63.2500 -->" in first


def test_figures_the_doc_no_longer_embeds_are_removed(tmp_path):
    figures = tmp_path / "doc" / "figures"
    figures.mkdir(parents=True)
    for name in ("old-generation.png", "kept.png"):
        (figures / name).write_bytes(b"png")
    removed = results_doc.drop_unreferenced_figures(tmp_path / "doc" / "results.md", "![x](figures/kept.png)")
    assert removed == ["old-generation.png"] and sorted(p.name for p in figures.iterdir()) == ["kept.png"]


def test_store_strips_the_run_and_the_skip_rule_needs_command_and_digest(tmp_path):
    src, dest = tmp_path / "out" / "ppl" / "W4A4", tmp_path / "runs" / "ppl" / "W4A4"
    (src / "plots" / "data").mkdir(parents=True)
    (src / "plots" / "data" / "layer001_q.safetensors").write_bytes(b"x" * 10)
    run = _run("ppl/W4A4", 100.0) | {"_path": "/somewhere", "plots": {"dir": "plots",
                                                                     "data": ["plots/data/layer001_q.safetensors"]}}
    (src / "results.json").write_text(json.dumps(run))
    doc_runs.store(src, dest, "main.py m --wbits 4")
    stored = json.loads((dest / "results.json").read_text())
    assert "_path" not in stored and stored["ppl"] == {"ptb": 100.0, "wiki_leads": 20.0}
    assert (dest / "plots/data/layer001_q.safetensors").read_bytes() == b"x" * 10
    assert (dest / "command.txt").read_text() == "main.py m --wbits 4\n"
    assert doc_runs.is_current(dest, "main.py m --wbits 4", DIGEST)
    assert not doc_runs.is_current(dest, "main.py m --wbits 3", DIGEST)
    assert not doc_runs.is_current(dest, "main.py m --wbits 4", "another")
    (dest / "results.json").unlink()
    assert not doc_runs.is_current(dest, "main.py m --wbits 4", DIGEST)


def test_script_plan_has_the_settings_the_new_rows_and_the_seed_variants():
    out = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PLAN_ONLY": "1"}, capture_output=True,
                         text=True, check=True).stdout
    plan = [line.split("\t") for line in out.splitlines()]
    cmd = {name: c for _, _, name, c in plan}
    assert len(cmd) == len(plan) == len(all_runs()) and set(cmd) == set(all_runs())
    tiers = [int(t) for t, _, _, _ in plan]
    assert tiers == sorted(tiers) and plan[0][2] == "ppl/FP16"  # most useful first
    assert all(name.endswith(("-seed3", "-seed4")) == (t == "2" and s == "methods") for t, s, name, _ in plan)
    order = [name for _, _, name, _ in plan]  # the spread before zero-shot: it decides what may be compared
    assert max(i for i, n in enumerate(order) if n.endswith("-seed4")) < order.index("tasks/FP16")
    assert tiers.index(2) > max(i for i, (_, _, n, _) in enumerate(plan) if n == "methods/W4A4-quarot-duquant")
    for name, c in cmd.items():
        if not name.startswith("ref/"):
            assert "--nsamples 32 --seqlen 512" in c
        if name.startswith(("ppl/", "methods/", "weights/", "diffs/")):
            assert "--limit 40" in c and ("--ppl_datasets ptb " if name.startswith("diffs/") else
                                           "--ppl_datasets ptb,wiki_leads") in c
        if name.startswith("tasks/"):
            assert "--limit 500" in c and "--tasks piqa,arc_easy,arc_challenge,openbookqa,boolq" in c
    for name, flags in (("W4A4-quarot", "--method quarot --act_dist_plot --plot_layers mid --eval_ppl"),
                        ("W4A4-quarot-rtn", "--method quarot --w_quantizer rtn"),
                        ("W4A4-spinquant", "--method spinquant"),
                        ("W4A4-duquant-gptq", "--method duquant --w_quantizer gptq"),
                        ("W4A4-quarot-reorder", "--method quarot --transforms residual_rotate,reorder "
                                                "--abits_policy uniform"),
                        ("W4A4-quarot-duquant", "--method duquant --transforms residual_rotate,smooth,rotate,"
                                                "qk_rotate")):
        assert f"main.py smollm2-135m {flags}" in cmd[f"methods/{name}"]
    for key in SEEDED:
        for seed in (3, 4):
            assert cmd[f"{key}-seed{seed}"] == cmd[key].replace("--seed 2", f"--seed {seed}").replace(
                " --act_dist_plot --plot_layers mid", "")
    planned: dict[str, set[str]] = {}
    for _, sections, name, _ in plan:
        for s in sections.split():
            planned.setdefault(s, set()).add(name)
    assert planned == {s: set(keys) for s, keys in SECTION_RUNS.items()}


def test_residual_rotation_figure_pairs_the_unrotated_and_rotated_ranges(tmp_path, monkeypatch):
    """The R1 figure draws RPTQ's untransformed ranges (before) and QuaRot's input ranges (after) of the
    same layer and norm-fed point, and nothing for a point R1 is not the only transform of."""
    import numpy as np
    import torch

    from docgen.doc_figures import residual_rotation_figures
    from eval.plot_data import write_plot_data

    width = 16
    spread = torch.linspace(1, 50, width)  # one outlier-ish channel profile, and the flat one after rotation
    flat = torch.full((width,), 6.0)
    for key, ranges, method in (("ppl/W4A4", spread, "rptq"), ("methods/W4A4-quarot", flat, "quarot")):
        root = tmp_path / key
        tensors = {"before_min": -ranges, "before_max": ranges.clone(), "after_min": -ranges, "after_max": ranges.clone()}
        rels = [write_plot_data(root, 15, point, tensors, model="m", method=method, transform="none")
                for point in ("qkv_in", "down_in")]
        (root / "results.json").write_text("{}")
        if key == "methods/W4A4-quarot":
            quarot = {"_path": str(root / "results.json"), "plots": {"data": rels}, "model": "m"}
    rptq = {"_path": str(tmp_path / "ppl/W4A4/results.json")}
    captured = {}
    import docgen.doc_figures as figs

    real = figs.plot_channel_ranges
    monkeypatch.setattr(figs, "plot_channel_ranges",
                        lambda data, meta: captured.setdefault(meta["point"], (data, meta)) and real(data, meta))
    lines = residual_rotation_figures({"methods/W4A4-quarot": quarot}, rptq, tmp_path / "figures")
    assert list(captured) == ["qkv_in"]  # down_in has mlp_rotate of its own: not R1's figure
    data, meta = captured["qkv_in"]
    assert np.array_equal(data["before_max"], spread.numpy()) and np.array_equal(data["after_max"], flat.numpy())
    assert meta["method"] == "QuaRot R1"
    assert (tmp_path / "figures" / "w4a4-quarot-r1-layer015_qkv_in.png").is_file()
    assert any("figures/w4a4-quarot-r1-layer015_qkv_in.png" in line for line in lines)


def test_ratio_keeps_its_digits_when_the_reference_collapsed():
    from docgen.doc_cells import ratio
    assert ratio(314.65, 1213299.53) == "×2.6e-04"  # GPTQT against a collapsed GPTQ: not "×0.00"
    assert ratio(84.61, 179.92) == "×0.47" and ratio(1.0, 0.0) == "–"


def test_task_on_which_every_row_scores_alike_is_said_to_separate_nothing():
    """boolq at 42.0, 42.0, 41.8 (stderr 2.2): spread 0.2 points < one stderr; piqa 66, 56, 59 is not flagged."""
    def row(w, a, piqa, boolq):
        return {"config": {"wbits": w, "abits": a, "limit": 500}, "method": {"name": "rptq"},
                "tasks": {"piqa": {"acc_norm": piqa, "acc_norm_stderr": 0.021},
                          "boolq": {"acc": boolq, "acc_stderr": 0.022}}}
    from docgen.results_doc import task_section
    lines = task_section({"FP16": row(16, 16, 0.66, 0.42), "W4A4": row(4, 4, 0.56, 0.42),
                          "W8A8": row(8, 8, 0.59, 0.418)})
    assert ("- boolq separates no rows: all 3 lie within 0.2 points of each other, less than one stderr (2.2); the "
            "model's answers there hardly depend on the quantization.") in lines
    assert not any(line.startswith("- piqa separates") for line in lines)


def test_second_model_plans_its_sections_and_leaves_out_what_it_refuses(tmp_path):
    """MODEL=gemma3-270m: its own tree and doc, only the paper/methods/tasks runs, none that rotates the
    residual (Gemma 3 refuses it in one line: the script lists those in RUNS/refused.tsv instead)."""
    env = {**os.environ, "PLAN_ONLY": "1", "MODEL": "gemma3-270m"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True).stdout
    plan = [line.split("\t") for line in out.splitlines()]
    names = {name for _, _, name, _ in plan}
    assert "ppl/FP16" in names and "methods/W4A4-duquant-gptq-seed4" in names and "tasks/W4A4" in names
    assert not any(n.startswith(("diffs/", "weights/", "ref/")) for n in names)
    assert not any(("quarot" in c or "spinquant" in c or "residual_rotate" in c) for *_, c in plan)
    assert all(c.startswith("main.py gemma3-270m ") for *_, c in plan)
    smollm2 = {line.split("\t")[2] for line in subprocess.run(
        ["bash", str(SCRIPT)], env={**os.environ, "PLAN_ONLY": "1"}, capture_output=True, text=True,
        check=True).stdout.splitlines()}
    rotating = {n for n in smollm2 if "quarot" in n or "spinquant" in n}
    assert rotating and not rotating & names


def test_a_plotted_run_without_its_plot_data_is_not_current(tmp_path):
    """A run resumed past its plotted layer stores no plot data: the skip rule reruns it so the figure comes back;
    a run not asked to plot needs none."""
    dest = tmp_path / "runs" / "methods" / "W4A4-quarot"
    dest.mkdir(parents=True)
    cmd = "main.py m --method quarot --act_dist_plot --plot_layers mid"
    (dest / "command.txt").write_text(cmd + "\n")
    run = _run("methods/W4A4-quarot", 95.0) | {"plots": {"dir": "plots", "data": []}, "resumed_from_layer": 27}
    (dest / "results.json").write_text(json.dumps(run))
    assert not doc_runs.is_current(dest, cmd, DIGEST)
    run["plots"]["data"] = ["plots/data/layer015_qkv_in.safetensors"]
    (dest / "results.json").write_text(json.dumps(run))
    assert doc_runs.is_current(dest, cmd, DIGEST)
    plain = "main.py m --method quarot"
    (dest / "command.txt").write_text(plain + "\n")
    run["plots"]["data"] = []
    (dest / "results.json").write_text(json.dumps(run))
    assert doc_runs.is_current(dest, plain, DIGEST)


def test_a_second_models_doc_prunes_only_its_own_figures(tmp_path):
    """docs/results-<model>.md draws into docs/figures-results-<model>/ and prunes there alone: SmolLM2's
    docs/figures/ survives a render of the other doc."""
    doc = tmp_path / "doc" / "results-gemma3-270m.md"
    ours, theirs = tmp_path / "doc" / "figures", tmp_path / "doc" / "figures-results-gemma3-270m"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
        for name in ("old.png", "kept.png"):
            (folder / name).write_bytes(b"png")
    removed = results_doc.drop_unreferenced_figures(doc, "![x](figures-results-gemma3-270m/kept.png)")
    assert removed == ["old.png"] and sorted(p.name for p in theirs.iterdir()) == ["kept.png"]
    assert sorted(p.name for p in ours.iterdir()) == ["kept.png", "old.png"]
