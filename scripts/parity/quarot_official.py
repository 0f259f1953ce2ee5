"""Run the official QuaRot code (spcl/QuaRot, fake_quant/) on the tiny Llama parity fixture and record its figures.

Runs in a scratch environment outside the project (QuaRot pins transformers 4.38.0; this project pins 5.x), on
CPU in fp32, fed the fixture's windows (scripts/parity/fixture.py --model tiny-llama) instead of its data loaders:

    /tmp/qrenv/bin/python scripts/parity/quarot_official.py --repo /tmp/ref/quarot \\
        --fixture /tmp/parity-llama --out tests/parity/quarot.json

--repo is a checkout of the official repository (nothing of it enters this project). The script copies it to a
temporary directory, applies the changes listed in PATCHES and writes ADDED (printed, and recorded in the JSON),
and calls its fake_quant/main.py's main() unchanged, with the command-line flags of each setting; only its data
loaders (data_utils.get_loaders: the fixture's windows instead) and its evaluator (the same arithmetic over the
fixture's evaluation windows) are replaced, and its model loader returns the fixture's model (--model accepts
only its list of names: it is given Llama-2-7b's) at the windows' sequence length (256, not 2048).

The fixture is a tiny random Llama (hidden 256 = 4 heads of 64, 2 KV heads, MLP 512): the official code's online
Hadamard across heads needs a power-of-two head count, which SmolLM2 (9 heads) lacks. QuaRot's R1 is a randomized
Hadamard whose signs come from torch's global generator, seeded by its --seed: a rotated setting's official figure
is a distribution, run over several seeds, and ours is compared with that spread. Without rotation (QuaRot's
quantizers alone) the official code is deterministic and ours is compared figure to figure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from official import (FAST_HADAMARD, WeightErrors, argv, check_stand_in, forget, jitter_, perplexity,
                      run_seeded)

PATCHES = (
    ("fake_quant/hadamard_utils.py", "W_ = W_.float().cuda()", "W_ = W_.float()",
     "apply_exact_had_to_linear moves each weight to the GPU to rotate it; here it stays on the CPU"),
)
ADDED = (("fake_quant/fast_hadamard_transform.py", FAST_HADAMARD,
          "stands in for the CUDA extension fast_hadamard_transform: the same Sylvester Hadamard transform as a "
          "torch butterfly (checked against the official pure-torch hadamard_utils.matmul_hadU before each run)"),)
CUDA_NO_OPS = ("synchronize", "empty_cache")  # GPTQ's fasterquant synchronizes
OFFICIAL_MODULES = ("utils", "model_utils", "data_utils", "quant_utils", "rotation_utils", "gptq_utils",
                    "eval_utils", "hadamard_utils", "monkeypatch", "main", "fast_hadamard_transform")

# The paper's W4A4KV4 flags (its section 5: activations clipped at 0.9, K and V asymmetric per head clipped at
# 0.95, weights per row with the clipping search, then GPTQ); the README's example omits the clip ratios.
PAPER = {"rotate": True, "w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4, "w_clip": True, "a_clip_ratio": 0.9,
         "k_clip_ratio": 0.95, "v_clip_ratio": 0.95, "k_asym": True, "v_asym": True, "k_groupsize": 64,
         "v_groupsize": 64}
NO_ROTATION = {"rotate": False}
FP_ACTIVATIONS = {"a_bits": 16, "k_bits": 16, "v_bits": 16}
# The official code rotates Q and K by a Hadamard (R3) wherever K is quantized, with or without --rotate.
OURS = ["--method", "quarot"]
# name -> (the official flags that differ from PAPER, this project's flags with the same semantics)
SETTINGS = {
    "W4A16-RTN-no-rotation": ({**NO_ROTATION, **FP_ACTIVATIONS, "w_rtn": True},
                              OURS + ["--transforms", "", "--abits", "16", "--w_quantizer", "rtn"]),
    "W4A16-no-rotation": ({**NO_ROTATION, **FP_ACTIVATIONS}, OURS + ["--transforms", "", "--abits", "16"]),
    "W16A4KV4-no-rotation": ({**NO_ROTATION, "w_bits": 16},
                             OURS + ["--transforms", "qk_rotate", "--wbits", "16"]),
    "W16A16-rotated": ({"w_bits": 16, **FP_ACTIVATIONS}, OURS + ["--wbits", "16", "--abits", "16"]),
    "W16A4KV4": ({"w_bits": 16}, OURS + ["--wbits", "16"]),
    "W4A4KV4-RTN": ({"w_rtn": True}, OURS + ["--w_quantizer", "rtn"]),
    "W4A4KV4": ({}, OURS),  # the paper's flags as they are
}
ROTATED = {"W16A16-rotated", "W16A4KV4", "W4A4KV4-RTN", "W4A4KV4"}  # their official figure depends on --seed
LINEARS_PER_LAYER = 7
MODEL_CHOICE = "meta-llama/Llama-2-7b-hf"  # --model takes only names from its list; the loader returns the fixture


def run(code_dir: Path, model_dir: Path, calib: torch.Tensor, evaluation: torch.Tensor, flags: dict | None,
        seed: int, jitter: int = 0) -> tuple[float, list[float]]:
    """Official main.main() with ``flags`` (None: the model unquantized) and --seed ``seed``, on the fixture's model
    moved by float noise (:func:`jitter_`) when ``jitter`` is not 0: (perplexity, GPTQ's relative weight error per
    layer)."""
    from transformers import LlamaForCausalLM

    if flags is None:
        return perplexity(LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval(),
                          evaluation), []
    src = str(code_dir / "fake_quant")
    sys.path.insert(0, src)
    saved_argv, result, errors = sys.argv, {}, WeightErrors(LINEARS_PER_LAYER)
    try:
        import data_utils
        import eval_utils
        import gptq_utils
        import hadamard_utils
        import main
        import model_utils

        check_stand_in(hadamard_utils.matmul_hadU)
        get_llama = model_utils.get_llama

        def fixture_model(name, hf_token):  # the fixture's model, at the windows' length (not Llama-2's 2048)
            model = get_llama(str(model_dir), hf_token)
            model.seqlen = calib.shape[1]
            if jitter:
                jitter_(model, jitter)
            return model

        def fixture_windows(name, nsamples=128, seed=0, seqlen=2048, model="", hf_token=None, eval_mode=False):
            return evaluation if eval_mode else [(w.unsqueeze(0), None) for w in calib]

        def evaluate(model, testenc, dev, args):
            result["ppl"] = perplexity(model, testenc)
            return result["ppl"]

        model_utils.get_llama = fixture_model
        data_utils.get_loaders = fixture_windows
        eval_utils.evaluator = evaluate
        errors.observe(gptq_utils.GPTQ)
        sys.argv = ["main.py", "--model", MODEL_CHOICE, "--seed", str(seed), "--nsamples", str(len(calib)),
                    *argv({**PAPER, **flags})]
        main.main()
    finally:
        sys.argv = saved_argv
        forget(OFFICIAL_MODULES)
        sys.path.remove(src)
    return result["ppl"], errors.by_layer()


def main() -> None:
    run_seeded(__doc__, "spcl/QuaRot", "tests/parity/quarot.json", run, SETTINGS, ROTATED, patches=PATCHES,
               cuda_no_ops=CUDA_NO_OPS, modules=OFFICIAL_MODULES, added=ADDED,
               ignore=("quarot", "e2e", "benchmarks", "img"))


if __name__ == "__main__":
    main()
