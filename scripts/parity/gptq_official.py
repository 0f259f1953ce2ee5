"""Run the official GPTQ code (IST-DASLab/gptq, opt.py) on the parity fixture and record its figures.

Runs in the scratch environment of rptq_official.py (transformers 4.29), on CPU, fed the fixture's windows:

    /tmp/refenv/bin/python scripts/parity/gptq_official.py --repo /tmp/ref/gptq \\
        --fixture /tmp/parity-fixture --out tests/parity/gptq.json

It imports opt.py's `opt_sequential` (weights only, activations FP) from an unchanged copy of the repository,
with the module-level `args` its __main__ would set, and evaluates with its opt_eval's arithmetic.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from official import WeightErrors, parser, perplexity, run_all

CUDA_NO_OPS = ("synchronize", "empty_cache")  # fasterquant synchronizes; opt_sequential empties the cache
# name -> (opt.py's flags, this project's flags with the same semantics): GPTQ's grid is the full asymmetric
# one with 0 inside every range (--grid full --w_range with_zero), no reordering, activations FP.
OURS = ["--abits", "16", "--reorder", "", "--grid", "full", "--w_range", "with_zero"]
SETTINGS = {
    "W4A16": ({"wbits": 4}, ["--wbits", "4", *OURS]),
    "W3A16": ({"wbits": 3}, ["--wbits", "3", *OURS]),
    "W2A16": ({"wbits": 2}, ["--wbits", "2", *OURS]),
    "W4A16-g32-static": ({"wbits": 4, "groupsize": 32, "static_groups": True},
                         ["--wbits", "4", "--w_group_size", "32", *OURS]),
    "W3A16-g32-static": ({"wbits": 3, "groupsize": 32, "static_groups": True},
                         ["--wbits", "3", "--w_group_size", "32", *OURS]),
    # opt.py's default groups take their range when the sweep reaches them (on the error-updated weights);
    # ours fixes every group's range before the sweep, as its --static_groups does: a measured difference
    "W4A16-g32": ({"wbits": 4, "groupsize": 32}, ["--wbits", "4", "--w_group_size", "32", *OURS]),
}
DIFFERENCES = {"W4A16-g32": "opt.py's default groups take their range when the sweep reaches them, on the "
                            "error-updated weights; ours fixes every group's range before the sweep (its "
                            "--static_groups)"}
LINEARS_PER_LAYER = 6


def official_args(settings: dict, nsamples: int) -> SimpleNamespace:
    """opt.py's argparse defaults, with ``settings`` applied."""
    a = SimpleNamespace(nsamples=nsamples, percdamp=0.01, wbits=16, groupsize=-1, sym=False, trits=False,
                        act_order=False, static_groups=False, seed=0)
    for k, v in settings.items():
        setattr(a, k, v)
    return a


def run_setting(code_dir: Path, model_dir: Path, calib: torch.Tensor, evaluation: torch.Tensor,
                settings: dict | None) -> tuple[float, list[float]]:
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    errors = WeightErrors(LINEARS_PER_LAYER)
    if settings is not None:
        sys.path.insert(0, str(code_dir))
        import gptq
        import opt

        errors.observe(gptq.GPTQ)
        opt.args = official_args(settings, calib.shape[0])
        model.seqlen = calib.shape[1]
        opt.opt_sequential(model, [(w.unsqueeze(0),) for w in calib], "cpu")
    return perplexity(model, evaluation), errors.by_layer()


def main() -> None:
    args = parser(__doc__, "IST-DASLab/gptq", "tests/parity/gptq.json").parse_args()

    def measure(code_dir, model_dir, calib, evaluation, name, theirs):
        ppl, errors = run_setting(code_dir, model_dir, calib, evaluation, theirs)
        return {"ppl": ppl, **({"gptq_weight_error_by_layer": errors} if errors else {}),
                **({"deliberate_difference": DIFFERENCES[name]} if name in DIFFERENCES else {})}

    run_all(args, "IST-DASLab/gptq", SETTINGS, measure, cuda_no_ops=CUDA_NO_OPS, ignore=("zeroShot",),
            modules=("gptq", "opt", "quant", "modelutils", "datautils"))


if __name__ == "__main__":
    main()
