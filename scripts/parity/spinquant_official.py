"""Run the official SpinQuant code (facebookresearch/SpinQuant, its PTQ path) on the tiny Llama parity fixture and
record its figures.

Runs in a scratch environment outside the project (SpinQuant pins transformers 4.44.2; this project pins 5.x), on
CPU in fp32, fed the fixture's windows (scripts/parity/fixture.py --model tiny-llama) instead of its data loader:

    /tmp/spenv/bin/python scripts/parity/spinquant_official.py --repo /tmp/ref/spinquant \\
        --fixture /tmp/parity-llama --out tests/parity/spinquant.json

--repo is a checkout of the official repository (nothing of it enters this project). The script copies it to a
temporary directory, applies the changes listed in PATCHES and writes ADDED (printed, and recorded in the JSON), then
does what its ptq.py does without the distributed launcher: its own LlamaForCausalLM (eval_utils/modeling_llama.py)
loads the fixture's model, its eval_utils.main.ptq_model quantizes it with its argument parser's flags (the
released W4A4KV4 script's: --w_clip --a_asym --k_asym --v_asym, K and V per head, --rotate), and perplexity is
measured with its evaluator's arithmetic over the fixture's evaluation windows.

This is SpinQuant's no-learning path (SpinQuant_had: R1 and every layer's R2 randomized Hadamards, seeded by its
--seed, then GPTQ): its learned path (optimize_rotation.py) trains the rotations with its distributed trainer on GPUs.
Ours runs it as --method spinquant --spin_steps 0. Rotated settings are compared with the official spread over
seeds; deterministic ones figure to figure, widened by float-noise draws of the weights as for QuaRot.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from official import (FAST_HADAMARD, WeightErrors, argv, check_stand_in, forget, jitter_, perplexity,
                      run_seeded)

PATCHES = (
    ("eval_utils/main.py", '"cuda"', '"cpu"', "GPTQ and RTN are told to run on the GPU; here on the CPU"),
    ("eval_utils/rotation_utils.py", 'device="cuda"', 'device="cpu"',
     "the rotations are applied on the GPU (in float64); here on the CPU (in float64)"),
    ("utils/hadamard_utils.py", "W_ = W_.float().cuda()", "W_ = W_.float()",
     "apply_exact_had_to_linear moves each weight to the GPU to rotate it; here it stays on the CPU"),
    ("utils/hadamard_utils.py", 'hadamard_matrix(had_dim, "cuda")', 'hadamard_matrix(had_dim, "cpu")',
     "the per-head Hadamard is built on the GPU; here on the CPU"),
    ("eval_utils/gptq_utils.py", "(args.nsamples, 2048, model.config.hidden_size)",
     "(args.nsamples, model.seqlen, model.config.hidden_size)",
     "GPTQ's input buffer is sized for 2048-token windows; here for the fixture's (model.seqlen, 256)"),
)
ADDED = (("fast_hadamard_transform.py", FAST_HADAMARD,
          "stands in for the CUDA extension fast_hadamard_transform: the same Sylvester Hadamard transform as a "
          "torch butterfly (checked against the official pure-torch hadamard_utils.matmul_hadU before each run)"),)
NOTES = ("the model is loaded in fp32 (ptq.py loads bf16 or fp16 for the GPU)",)
CUDA_NO_OPS = ("synchronize", "empty_cache")
OFFICIAL_MODULES = ("eval_utils", "utils", "train_utils", "fast_hadamard_transform")

# The released W4A4KV4 evaluation script's flags (scripts/2_eval_ptq.sh), with K/V groups of this head_dim (64)
SCRIPT = {"rotate": True, "w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4, "w_clip": True, "a_asym": True,
          "k_asym": True, "v_asym": True, "k_groupsize": 64, "v_groupsize": 64}
NO_ROTATION = {"rotate": False}
METHOD = ["--method", "spinquant"]
OURS = METHOD + ["--spin_steps", "0"]  # no learning: R1 and R2 stay the seeded randomized Hadamards
# name -> (the official flags that differ from SCRIPT, this project's flags with the same semantics)
SETTINGS = {
    "W4A16-no-rotation": ({**NO_ROTATION, "a_bits": 16, "k_bits": 16, "v_bits": 16},
                          METHOD + ["--transforms", "", "--abits", "16"]),
    "W16A4KV4-no-rotation": ({**NO_ROTATION, "w_bits": 16}, METHOD + ["--transforms", "qk_rotate", "--wbits", "16"]),
    "W16A4KV4": ({"w_bits": 16}, OURS + ["--wbits", "16"]),
    "W4A4KV4": ({}, OURS),  # the released script's flags as they are
}
ROTATED = {"W16A4KV4", "W4A4KV4"}  # their official figure depends on --seed (R1's and R2's random signs)
LINEARS_PER_LAYER = 7


def run(code_dir: Path, model_dir: Path, calib: torch.Tensor, evaluation: torch.Tensor, flags: dict | None,
        seed: int, jitter: int = 0) -> tuple[float, list[float]]:
    """ptq.py's steps with ``flags`` (None: the model unquantized) and --seed ``seed`` on the fixture's model (moved
    by float noise when ``jitter`` is not 0): (perplexity, GPTQ's relative weight error per layer)."""
    sys.path.insert(0, str(code_dir))
    saved_argv, errors = sys.argv, WeightErrors(LINEARS_PER_LAYER)
    try:
        from eval_utils.modeling_llama import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
        if flags is None:
            return perplexity(model, evaluation), []
        from eval_utils import gptq_utils
        from eval_utils import main as ptq
        from utils import data_utils, hadamard_utils
        from utils.process_args import parser_gen

        check_stand_in(hadamard_utils.matmul_hadU)
        sys.argv = ["ptq.py", "--seed", str(seed), "--nsamples", str(len(calib)), *argv({**SCRIPT, **flags})]
        args, _ = parser_gen()
        args.optimized_rotation_path, args.bsz = None, 1  # what process_args_ptq adds
        model.seqlen = calib.shape[1]
        if jitter:
            jitter_(model, jitter)
        data_utils.get_wikitext2 = lambda *a, eval_mode=False, **k: [(w.unsqueeze(0), None) for w in calib]
        errors.observe(gptq_utils.GPTQ)
        model = ptq.ptq_model(args, model, SimpleNamespace(input_model=str(model_dir)))
        return perplexity(model, evaluation), errors.by_layer()
    finally:
        sys.argv = saved_argv
        forget(OFFICIAL_MODULES)
        sys.path.remove(str(code_dir))


def main() -> None:
    run_seeded(__doc__, "facebookresearch/SpinQuant", "tests/parity/spinquant.json", run, SETTINGS, ROTATED,
               patches=PATCHES, cuda_no_ops=CUDA_NO_OPS, modules=OFFICIAL_MODULES, added=ADDED, notes=NOTES,
               ignore=("*.png",))


if __name__ == "__main__":
    main()
