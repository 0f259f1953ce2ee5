"""eval.table on synthetic results.json files, and scripts/sweep_bits.sh end to end on a tiny OPT."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from eval import cli, runs, table
from rptq.config import QuantConfig
from rptq.run_report import method_info, preset_defaults
from tests.helpers import save_tiny_opt_dir

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["FP16", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV"]
FLAGS = {"FP16": (16, 16, False), "W4A16": (4, 16, False), "W4A8": (4, 8, False), "W4A4": (4, 4, False),
         "W4A4KV": (4, 4, True), "W4A3KV": (4, 3, True), "W3A3KV": (3, 3, True)}


def method_section(cfg: dict) -> dict:
    """results.json's "method" as rptq writes it: the name and the defaults its preset implied."""
    method = cfg.get("method", "rptq")
    return {"name": method, "defaults": preset_defaults(method)}


def write_run(path: Path, wbits=4, abits=4, only_quant_kv=False, ppl=None, tasks=None, timing=None, recorded=True,
              **cfg):
    config = {"model": "opt-1.3b", "eval_ppl": True, "limit": -1, "nsamples": 128, "seqlen": 2048,
              "calib_dataset": "mix", "num_fewshot": 0, "wbits": wbits, "abits": abits,
              "only_quant_kv": only_quant_kv, "abits_policy": "rptq", "reorder": "12345",
              "clusters": {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32}, "metric": "ema_minmax",
              "a_dynamic": False, "w_quantizer": "gptq", "percdamp": 0.01, "disable_w_quant": False,
              "disable_a_quant": False, "seed": 2, **cfg}
    data = {"model": config["model"], "config": config, "bit_manifest": {}, "ppl": ppl or {"ptb": 10.0},
            "tasks": tasks or {}, "timing": timing or {"calibration_s": 1.0, "eval_s": 2.0},
            "memory": {"peak_rss_mb": 1.0}, "versions": {}}
    if recorded:  # recorded=False: a results.json from before "method" carried the preset's defaults
        data["method"] = method_section(config)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(data))


def body(text: str) -> list[list[str]]:
    """Table rows (after header and rule) as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def header(text: str) -> list[str]:
    return [c.strip() for c in text.splitlines()[0].strip("|").split("|")]


def test_paper_labels_and_row_order(tmp_path):
    for i, name in enumerate(reversed(PAPER)):  # written in the wrong order, nested at varying depth
        w, a, kv = FLAGS[name]
        write_run(tmp_path / ("deep" if i % 2 else "") / name.lower(), w, a, kv)
    write_run(tmp_path / "w8a8", 8, 8)
    write_run(tmp_path / "base", 4, 4, reorder="")
    write_run(tmp_path / "uni", 4, 4, abits_policy="uniform")
    write_run(tmp_path / "rtn", 3, 16, w_quantizer="rtn", reorder="14")
    found = runs.load_runs([tmp_path])
    assert len(found) == 11 and all(Path(r["_path"]).name == "results.json" for r in found)
    labels = [row[0] for row in body(table.render_table(found))]
    assert labels == ["FP16", "W4A16", "W4A8", "W4A4", "W4A4 (per-tensor baseline)", "W4A4 (uniform)",
                      "W4A4KV", "W4A3KV", "W3A3KV", "W8A8", "W3A16 (reorder R1,R4, RTN)"]


def notes(cfg: dict) -> list[str]:
    return runs.method_notes({"config": cfg, "method": method_section(cfg)})


def test_label_edge_cases():
    base = {"wbits": 4, "abits": 4, "reorder": "12345", "clusters": {"R1": 32, "R2": 4, "R3": 4, "R4": 32}}
    assert runs.row_label({**base, "disable_a_quant": True}) == "W4A16"
    assert notes({**base, "disable_a_quant": True}) == ["--disable_a_quant"]
    assert runs.row_label({**base, "abits": 16, "only_quant_kv": True}) == "W4A16"
    assert runs.row_label({**base, "wbits": 16, "abits": 16, "reorder": ""}) == "FP16"
    assert notes({**base, "wbits": 16, "abits": 16, "reorder": ""}) == []
    # the uniform policy means nothing when only K/V are quantized
    assert notes({**base, "only_quant_kv": True, "abits_policy": "uniform"}) == []
    assert notes({**base, "clusters": {**base["clusters"], "R1": 2}}) == ["clusters R1=2"]


def test_notes_compare_with_the_runs_own_recorded_defaults():
    """The defaults come from the run's results.json, not from this process's presets: a method's
    own settings are no note, other settings are, and what rptq writes is what the table reads."""
    smooth = {"method": "smoothquant", "wbits": 8, "abits": 8, "transforms": ["smooth"], "abits_policy": "smoothquant",
              "grid": "symmetric", "w_quantizer": "rtn", "w_group_size": 0}
    assert notes(smooth) == ["smoothquant"]
    assert notes({**smooth, "grid": "full", "w_quantizer": "gptq"}) == ["smoothquant", "grid full", "GPTQ"]
    recorded = method_info(QuantConfig(method="smoothquant"))["defaults"]
    assert recorded == preset_defaults("smoothquant") and recorded["grid"] == "symmetric"
    assert runs.clusters(recorded) == {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32}
    json.dumps(recorded)  # it goes into results.json
    # defaults recorded differently (e.g. by a later version's preset) are the ones used
    run = {"config": smooth, "method": {"name": "smoothquant", "defaults": {**recorded, "grid": "full"}}}
    assert runs.method_notes(run) == ["smoothquant", "grid symmetric"]


def test_results_without_recorded_defaults_name_the_method_and_say_so(tmp_path):
    """A results.json from before "method" carried "defaults": no preset-relative notes (they would
    need the presets, which eval does not import), only the method, flags that need no defaults and
    NO_DEFAULTS; FP16 rows stay plain."""
    cfg = {"wbits": 4, "abits": 4, "reorder": "", "method": "smoothquant", "grid": "full", "a_dynamic": True,
           "disable_w_quant": True}
    assert runs.method_notes({"config": cfg}) == ["smoothquant", "--disable_w_quant", "dynamic acts",
                                                  runs.NO_DEFAULTS]
    assert runs.method_notes({"config": cfg, "method": {"name": "smoothquant"}})[-1] == runs.NO_DEFAULTS
    assert runs.method_notes({"config": {**cfg, "wbits": 16, "abits": 16}}) == []
    write_run(tmp_path / "old", 4, 4, reorder="", recorded=False)
    write_run(tmp_path / "new", 4, 4, reorder="")
    labels = sorted(row[0] for row in body(table.render_table(runs.load_runs([tmp_path]))))
    assert labels == [f"W4A4 ({runs.NO_DEFAULTS})", "W4A4 (per-tensor baseline)"]


def test_columns_values_and_formatting(tmp_path):
    write_run(tmp_path / "fp", 16, 16, ppl={"c4": 16.0741, "wiki_leads": 30.0, "ptb": 20.295, "wikitext2": 14.6234},
              tasks={"piqa": {"acc": 0.71234, "acc_stderr": 0.01, "acc_norm": 0.72},
                     "lambada_openai": {"acc": 0.5796, "perplexity": 6.6},
                     "arc_challenge": {"acc_norm": 0.29522}},
              timing={"calibration_s": 0.0, "eval_s": 123.456})
    write_run(tmp_path / "q", 4, 4, ppl={"wikitext2": 15.0, "zzz": float("nan")},
              tasks={"piqa": {"acc_norm": 0.5}}, timing={"calibration_s": 3600.04, "eval_s": 1.0})
    text = table.render_table(runs.load_runs([tmp_path]))
    assert header(text) == ["Run", "wikitext2 (ppl)", "ptb (ppl)", "c4 (ppl)", "wiki_leads (ppl)", "zzz (ppl)",
                            "lambada_openai (acc %)", "piqa (acc_norm %)", "arc_challenge (acc_norm %)",
                            "calib (s)", "eval (s)"]
    assert text.splitlines()[1] == "|---|" + "---:|" * 10
    fp, q = body(text)
    # piqa's column is the paper's acc_norm (72.00), never its acc (71.23)
    assert fp == ["FP16", "14.62", "20.30", "16.07", "30.00", "–", "57.96", "72.00", "29.52", "0.0", "123.5"]
    assert q == ["W4A4", "15.00", "–", "–", "–", "nan", "–", "50.00", "–", "3600.0", "1.0"]
    assert text.splitlines()[-1] == ("Settings: model opt-1.3b; calib mix; nsamples 128; seed 2; seqlen 2048; "
                                     "limit all; fewshot 0")


# every lm-eval 0.4 metric of the paper's tasks on one run (values distinct per metric)
ALL_METRICS = {
    "lambada_openai": {"acc": 0.11, "perplexity": 30.0},
    "piqa": {"acc": 0.717, "acc_norm": 0.725},
    "arc_easy": {"acc": 0.570, "acc_norm": 0.509},
    "arc_challenge": {"acc": 0.231, "acc_norm": 0.294},
    "openbookqa": {"acc": 0.21, "acc_norm": 0.33},
    "boolq": {"acc": 0.577},
    "hellaswag": {"acc": 0.41, "acc_norm": 0.53},
    "winogrande": {"acc": 0.59},
    "lambada_flat": {"acc": 0.12, "perplexity": 31.0},
    "sciq": {"acc": 0.75, "acc_norm": 0.68},
}


def test_task_columns_use_the_papers_metric(tmp_path):
    """piqa / ARC / OpenBookQA (and hellaswag) in acc_norm, boolq / lambada / winogrande in acc,
    unknown tasks in acc; the header names the metric; lambada_flat has its own column and a note."""
    write_run(tmp_path / "fp", 16, 16, tasks=ALL_METRICS)
    text = table.render_table(runs.load_runs([tmp_path]))
    expected = {"lambada_openai": "acc", "lambada_flat": "acc", "piqa": "acc_norm", "arc_easy": "acc_norm",
                "arc_challenge": "acc_norm", "openbookqa": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
                "sciq": "acc", "winogrande": "acc"}
    assert header(text)[2:-2] == [f"{t} ({expected[t]} %)" for t in
                                  ["lambada_openai", "lambada_flat", "piqa", "arc_easy", "arc_challenge",
                                   "openbookqa", "boolq", "hellaswag", "sciq", "winogrande"]]
    assert body(text)[0][2:-2] == ["11.00", "12.00", "72.50", "50.90", "29.40", "33.00", "57.70", "53.00",
                                   "75.00", "59.00"]
    for task, metric in expected.items():
        assert table.column_metric(task, ALL_METRICS[task]) == metric
    assert table.column_metric("piqa", {"acc"}) == "acc"  # a run without acc_norm: shown as acc, and said so
    assert table.column_metric("newtask", {"acc_norm"}) == "acc_norm"
    assert table.column_metric("newtask", {"perplexity"}) is None
    notes = [line for line in text.splitlines() if line.startswith("lambada_flat:")]
    assert len(notes) == 1 and "paragraph breaks collapsed" in notes[0] and "not the paper's" in notes[0]
    assert text.splitlines()[-1].startswith("Settings: ")


def test_settings_that_differ_go_into_labels(tmp_path):
    write_run(tmp_path / "a", 16, 16, nsamples=999)  # FP16 never calibrates: its nsamples is ignored
    write_run(tmp_path / "b", 4, 4, seqlen=512, nsamples=16)
    write_run(tmp_path / "c", 4, 4, seqlen=2048, nsamples=16, model="/models/opt-2.7b")
    text = table.render_table(runs.load_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"]))
    assert [row[0] for row in body(text)] == ["FP16 (model=opt-1.3b, seqlen=2048)",
                                             "W4A4 (model=opt-1.3b, seqlen=512)",
                                             "W4A4 (model=opt-2.7b, seqlen=2048)"]
    assert "nsamples 16" in text.splitlines()[-1] and "model" not in text.splitlines()[-1]


def test_cli_writes_table_atomically(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "runs" / "W4A4", 4, 4)
    out = tmp_path / "report" / "table.md"
    assert table.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed and "| W4A4 |" in printed
    assert os.listdir(out.parent) == ["table.md"]
    seen = []

    def failing_replace(src, dst):
        seen.append((Path(src).parent, Path(dst)))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(UserError, match="disk full"):
        cli.write_atomic(out, "new text")
    assert seen == [(out.parent, out)]  # the temporary file sits next to the target
    assert out.read_text() == printed and os.listdir(out.parent) == ["table.md"]


def test_bad_input_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results.json found"):
        runs.load_runs([tmp_path / "empty"])
    assert table.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results.json found") and err.count("\n") == 1
    assert table.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"config": ')
    with pytest.raises(UserError, match="not valid JSON"):
        runs.load_runs([tmp_path / "bad"])
    (tmp_path / "bad" / "results.json").write_text('{"ppl": {}}')
    with pytest.raises(UserError, match="not an RPTQ results.json"):
        runs.load_runs([tmp_path / "bad"])


def run_script(name, *args, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_scripts_reject_bad_arguments_before_running(tmp_path):
    env = {"OUT": str(tmp_path)}
    res = run_script("reproduce_table.sh", "m", env={**env, "ROWS": "FP16 W9A9"})
    assert res.returncode == 2 and "unknown row 'W9A9'" in res.stderr
    res = run_script("reproduce_table.sh", "m", "--wbits", "3", env=env)
    assert res.returncode == 2 and "--wbits is set per row" in res.stderr
    res = run_script("sweep_bits.sh", "m", "4 9", "4", env=env)
    assert res.returncode == 2 and "wbits 9" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_sweep_script_runs_then_skips_finished_rows(tmp_path):
    model = save_tiny_opt_dir(tmp_path / "tiny-opt", max_pos=256)
    out = tmp_path / "sweep"
    args = [model, "4", "4", "--calib_dataset", "ptb", "--nsamples", "2", "--seqlen", "32", "--limit", "2",
            "--ppl_datasets", "ptb", "--R1_clusters", "2", "--R4_clusters", "2", "--R5_clusters", "2",
            "--no_progress"]
    first = run_script("sweep_bits.sh", *args, env={"OUT": str(out)})
    assert first.returncode == 0, first.stderr[-2000:]
    result = out / "w4a4" / "results.json"
    data = json.loads(result.read_text())
    assert data["config"]["wbits"] == 4 and data["config"]["abits"] == 4 and "ptb" in data["ppl"]
    mtime = result.stat().st_mtime_ns
    second = run_script("sweep_bits.sh", *args, env={"OUT": str(out)})
    assert second.returncode == 0, second.stderr[-2000:]
    assert "skip w4a4" in second.stdout and "run w4a4" not in second.stdout
    assert result.stat().st_mtime_ns == mtime
    rows = body((out / "table.md").read_text())
    assert rows == body(second.stdout.split("wrote")[0])
    assert len(rows) == 1 and rows[0][0] == "W4A4 (clusters R1=2,R4=2,R5=2)"
    assert rows[0][1] == f"{data['ppl']['ptb']:.2f}"
