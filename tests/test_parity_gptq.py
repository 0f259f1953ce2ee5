"""Parity with the official GPTQ code (IST-DASLab/gptq's opt.py, run by scripts/parity/gptq_official.py).

tests/parity/gptq.json holds its figures on the RPTQ parity fixture (tiny OPT with outliers, fixed PTB windows);
ours runs plain GPTQ with the recorded flags (no reordering, activations FP, `--grid full --w_range with_zero`:
its asymmetric grid with 0 in every range). Measured when recorded (torch 2.13 CPU): FP within 1e-6; W4A16 per
row within 1.1e-5 and layer 0's weights bit-identical (weight error equal to 1e-7); W3A16 and W2A16 differ by
1.1e-3 and 6.3e-3 in perplexity, as much as the official code moves itself between CPU code paths (AVX-512 vs
AVX2: 1.1e-3 and 6.1e-3), while layer 0's weight error agrees to 1e-5; groups of 32 with the official
--static_groups within 2.3e-4. One deliberate difference: opt.py's default groups take their range when the
sweep reaches them (on the error-updated weights), ours before the sweep; the test asserts it is visible
(layer 0's weight error 3.8e-4 apart). The rule is scripts/parity/ours.py's `mismatches`.
"""
import json
from pathlib import Path

import pytest

from tests.helpers import load_script

ours = load_script("scripts/parity/ours.py")

RECORD = json.loads((Path(__file__).parent / "parity" / "gptq.json").read_text())
SETTINGS = RECORD["settings"]


@pytest.fixture(scope="module")
def fixture_inputs(tmp_path_factory):
    return ours.inputs(RECORD, tmp_path_factory.mktemp("parity-gptq"))


def test_the_record_names_the_official_commit():
    assert RECORD["official"]["repo"] == "IST-DASLab/gptq" and len(RECORD["official"]["commit"]) == 40
    assert set(RECORD["cpu_paths"]) == {"avx2"}


def test_unquantized_model_matches(fixture_inputs):
    assert ours.run(*fixture_inputs, None)["ppl"] == pytest.approx(SETTINGS["FP"]["ppl"], rel=ours.EXACT)


@pytest.mark.parametrize("name", [n for n, s in SETTINGS.items() if s["official_flags"]])
def test_setting_matches_the_official_code(name, fixture_inputs):
    got = ours.run(*fixture_inputs, SETTINGS[name]["our_flags"] + RECORD["shared_flags"])
    assert ours.mismatches(RECORD, name, got, SETTINGS["FP"]["ppl"]) == []
