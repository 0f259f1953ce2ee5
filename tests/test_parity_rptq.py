"""Parity with the official RPTQ code (hahnyuan/RPTQ4LLM, run by scripts/parity/rptq_official.py).

tests/parity/rptq.json holds the official figures on a tiny OPT with outliers and fixed PTB windows
(scripts/parity/fixture.py). Here the same model and windows are rebuilt (the windows' digest must match the
record's) and ours runs each setting with the recorded flags, which give the official semantics (this project's
defaults plus `--grid reference_clamped`, the official quantizer's clamps). Measured when recorded (torch 2.13 CPU):

- unquantized, and quantized with neither GPTQ nor k-means (W16A4 per tensor): perplexity within 1e-6;
- per tensor with GPTQ weights: within 3e-4 (layers 0-1 bit-identical; from layer 2 on, 1e-7 differences
  between the two forward implementations flip a few GPTQ roundings); the issue's bound is 1e-3;
- layer 0's GPTQ weight error (sum ||Q - W||^2 / sum ||W||^2): bit-identical quantized weights, so within float
  noise; 2e-4 leaves room for a few flipped roundings (~6e-5 each) and still catches a different column order
  (`--cluster_order feature`: 1.3e-3);
- with k-means clusters (R1-R5): the same partitions and order in layer 0, and later layers' k-means features
  differ by the same float noise, which moves clusters; so the excess over FP (log ppl - log FP) must lie in the
  range the official code itself spans over k-means seeds 0-4 and CPU code paths, widened by one standard
  deviation of it;
- the official code itself moves between CPU code paths (AVX-512 here, AVX2 with ATEN_CPU_CAPABILITY=avx2
  MKL_ENABLE_INSTRUCTIONS=AVX2: W4A4 +1.6e-3, W3A3 +1.0e-3), so a perplexity tolerance is at least twice that
  move, or parity would hold on one machine only. The rule is scripts/parity/ours.py's `mismatches`.
"""
import json
from pathlib import Path

import pytest

from tests.helpers import load_script

ours = load_script("scripts/parity/ours.py")

RECORD = json.loads((Path(__file__).parent / "parity" / "rptq.json").read_text())
SETTINGS = RECORD["settings"]
QUANTIZED = [name for name, s in SETTINGS.items() if s["official_flags"]]


@pytest.fixture(scope="module")
def fixture_inputs(tmp_path_factory):
    return ours.inputs(RECORD, tmp_path_factory.mktemp("parity-rptq"))


@pytest.fixture(scope="module")
def fp_ppl(fixture_inputs):
    return ours.run(*fixture_inputs, None)["ppl"]


def test_the_record_names_the_official_commit_and_its_changes():
    official = RECORD["official"]
    assert official["repo"] == "hahnyuan/RPTQ4LLM" and len(official["commit"]) == 40
    assert official["versions"]["transformers"].startswith("4.29") and official["patches"]


def test_unquantized_model_matches(fp_ppl):
    assert fp_ppl == pytest.approx(SETTINGS["FP"]["ppl"], rel=1e-5)


@pytest.mark.parametrize("name", QUANTIZED)
def test_setting_matches_the_official_code(name, fixture_inputs, fp_ppl):
    setting = SETTINGS[name]
    got = ours.run(*fixture_inputs, setting["our_flags"] + RECORD["shared_flags"])
    assert ours.mismatches(RECORD, name, got, fp_ppl) == []


def test_the_results_doc_shows_these_figures():
    from docgen.parity_doc import parity_section

    lines = parity_section()
    text = "\n".join(lines)
    assert f"@ `{RECORD['official']['commit'][:10]}`" in text
    assert all(f"| {name} |" in text for name in SETTINGS)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    stale = [line for line in lines if line and line not in doc]
    assert not stale, f"docs/results.md is stale ({stale[0][:80]}...): run python -m docgen.results_doc"
