"""Parity with the authors' own code: each tests/parity/<method>.json holds an official implementation's figures on
a parity fixture (a tiny OPT with outliers, a tiny Llama with massive channels or SmolLM2, with fixed PTB windows;
scripts/parity/fixture.py), made by
scripts/parity/<method>_official.py, with the flags that give its semantics here. Each test rebuilds the fixture
(the windows' digest must match the record's), runs ours and applies scripts/parity/ours.py's `mismatches`: the
unquantized model within 1e-5; quantized without GPTQ or k-means within 1e-4; with GPTQ within 1e-3; layer 0's GPTQ
weight error within 2e-4; where the official figure is a distribution (k-means seeds, random rotations, or float-noise
draws of the weights where 4-bit roundings flip chaotically) the excess over FP inside it (ours.inside_spread); every
perplexity tolerance at least twice the official figure's own move to another CPU code path (AVX2 kernels).

Measured when recorded (torch 2.13 CPU, this machine's AVX-512 kernels):
- RPTQ (hahnyuan/RPTQ4LLM, with `--grid reference_clamped`, the official quantizer's clamps): FP 8.6e-7; W16A4 and
  W3A3 per tensor 8e-8 and 7.6e-7; per tensor with GPTQ <= 2.8e-4 (layers 0-1 bit-identical; from layer 2, 2e-7
  differences between the two forward implementations flip a few GPTQ roundings); layer 0 bit-identical at W4A4
  with clusters (a different GPTQ column order moves its weight error by 1.3e-3); clustered settings inside the
  official spread over k-means seeds 0-4. The official figure itself moves 1.6e-3 (W4A4) between CPU code paths.
- GPTQ (IST-DASLab/gptq opt.py; ours `--reorder "" --abits 16 --grid full --w_range with_zero`): W4 per row 1.1e-5,
  layer 0 bit-identical; W3/W2 1.1e-3 / 6.3e-3, as much as the official code moves itself between CPU code paths
  (1.1e-3 / 6.1e-3), layer 0's weight error equal to 1e-5; groups of 32 = its --static_groups (<= 2.3e-4). Its
  default dynamic groups are a deliberate difference, asserted visible (weight error 3.8e-4 apart).
- SmoothQuant (mit-han-lab/smoothquant; ours `--method smoothquant --a_dynamic --a_dynamic_method per_token
  --block_inputs fp`): without smoothing 3e-6; alpha 0.5 / 0.8: 2.5e-5 / 5.9e-5 (the folds round differently in the
  last bit; a few 8-bit roundings flip); the official moves up to 3.1e-5 between CPU code paths.
- QuaRot (spcl/QuaRot fake_quant, on the tiny Llama): FP and W4A16 RTN with its clipping search within 1e-6; GPTQ's
  layer 0 weight error equal to 4e-8 (its sequential order, --gptq_order sequential); with 4-bit activations or GPTQ
  the figure is chaotic on this model (one flipped rounding on a massive channel moves a token's output by ~6%; the
  official code moves up to 6.1e-3 under float-noise draws of the weights), and ours lies within those draws;
  rotated settings inside the official spread over its R1 seeds 0-4.
- SpinQuant (facebookresearch/SpinQuant's PTQ path without learning, on the tiny Llama): W4A16 GPTQ as QuaRot's (the
  same GPTQ code, the same official figure); W16A4KV4 without rotation 2.5e-4 from the official figure, inside its
  float-noise draws; rotated settings inside its spread over seeds 0-4.
- FlatQuant (ruikangliu/FlatQuant, on the tiny Llama, W4A4KV4): every figure depends on the seed of its random initial
  factors; untrained and trained (15 epochs) ours inside its spread over seeds 0-4 (trained: excess -2.2e-2, the
  official mean -2.5e-2, since LAC learns a factor per end of a range that reaches 0 as the official one does).
"""
import json
from pathlib import Path

import pytest

from tests.helpers import load_script

ours = load_script("scripts/parity/ours.py")

PARITY = Path(__file__).parent / "parity"
RECORDS = {p.stem: json.loads(p.read_text()) for p in sorted(PARITY.glob("*.json")) if not p.stem.endswith("-ours")}
# SmolLM2 records (official codes that only run Llama) take minutes per setting: `make test-heavy`; the tiny
# models' run in seconds
HEAVY = {m for m, r in RECORDS.items() if r["fixture"]["model"]["kind"] not in ("opt", "llama")}


# Settings whose run of ours takes most of a minute on the tiny fixtures (FlatQuant trains 15 epochs per layer)
HEAVY_SETTINGS = {("flatquant", "W4A4KV4")}


def _marks(method: str, setting: str = ""):
    return [pytest.mark.heavy] if method in HEAVY or (method, setting) in HEAVY_SETTINGS else []


CASES = [pytest.param(m, name, marks=_marks(m, name)) for m, r in RECORDS.items() for name in r["settings"]
         if name != "FP"]
METHODS = [pytest.param(m, marks=_marks(m)) for m in sorted(RECORDS)]


@pytest.fixture(scope="module")
def inputs_by_digest(tmp_path_factory):
    """Each fixture (tiny OPT, tiny Llama, SmolLM2) built once, its windows' digest checked against its records'
    (the two tiny models share their windows)."""
    built = {}

    def get(method: str):
        record = RECORDS[method]
        key = (record["fixture"]["windows_digest"], record["fixture"]["model"]["kind"])
        if key not in built:
            built[key] = ours.inputs(record, tmp_path_factory.mktemp("parity"))
        return built[key]

    return get


@pytest.fixture(scope="module")
def fp_by_digest(inputs_by_digest):
    ppl = {}

    def get(method: str) -> float:
        key = (RECORDS[method]["fixture"]["windows_digest"], RECORDS[method]["fixture"]["model"]["kind"])
        if key not in ppl:
            ppl[key] = ours.run(*inputs_by_digest(method), None)["ppl"]
        return ppl[key]

    return get


def test_official_implementations_are_recorded_with_their_commits():
    assert {r["official"]["repo"] for r in RECORDS.values()} >= {"hahnyuan/RPTQ4LLM", "IST-DASLab/gptq",
                                                                  "mit-han-lab/smoothquant", "Hsu1023/DuQuant",
                                                                  "spcl/QuaRot", "facebookresearch/SpinQuant",
                                                                  "ruikangliu/FlatQuant"}
    for record in RECORDS.values():
        assert len(record["official"]["commit"]) == 40 and record["official"]["patches"]
        assert set(record["cpu_paths"]) == {"avx2"}


@pytest.mark.parametrize("method", METHODS)
def test_unquantized_model_matches(method, fp_by_digest):
    assert fp_by_digest(method) == pytest.approx(RECORDS[method]["settings"]["FP"]["ppl"], rel=ours.EXACT)


@pytest.mark.parametrize("method,name", CASES)
def test_setting_matches_the_official_code(method, name, inputs_by_digest, fp_by_digest):
    record = RECORDS[method]
    got = ours.run(*inputs_by_digest(method), record["settings"][name]["our_flags"] + record["shared_flags"])
    assert ours.mismatches(record, name, got, fp_by_digest(method)) == []


def test_the_results_doc_shows_these_figures():
    from docgen.parity_doc import parity_section

    lines = parity_section()
    text = "\n".join(lines)
    for record in RECORDS.values():
        assert f"@ `{record['official']['commit'][:10]}`" in text
        assert all(f"| {name} |" in text for name in record["settings"])
    doc = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    stale = [line for line in lines if line and line not in doc]
    assert not stale, f"docs/results.md is stale ({stale[0][:80]}...): run python -m docgen.results_doc"
