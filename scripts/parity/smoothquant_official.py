"""Run the official SmoothQuant code (mit-han-lab/smoothquant: calibration.py's act scales, smooth.py, the
fake_quant.py W8A8 its ppl_eval uses) on the parity fixture and record its figures.

Its smooth.py imports Mistral/Mixtral/Falcon classes, so it needs a newer transformers than RPTQ's scratch
environment (4.44 here):

    /tmp/refenv2/bin/python scripts/parity/smoothquant_official.py --repo /tmp/ref/smoothquant \\
        --fixture /tmp/parity-fixture --out tests/parity/smoothquant.json

Its calibration reads a JSON dataset of text with `datasets` and tokenizes each sample; here `datasets` is
replaced at run time by the fixture's calibration windows (the tokenizer handed to it returns window i), so it
measures its activation scales on exactly our windows. No file of the official code is changed.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from official import parser, perplexity, run_all

# name -> (the official calls' arguments, this project's flags with the same semantics): symmetric absmax W8 per
# output row, A8 per token computed at every forward, Q/K/V outputs quantized the same way. (Its per-tensor
# activations are dynamic too, a range per forward; ours per tensor are static, calibrated: not compared.)
# The official code measures every activation scale on the FP model, so ours calibrates each block on the FP
# model's activations (--block_inputs fp) rather than on the quantized blocks' outputs, its default.
SHARED_FLAGS = ["--block_inputs", "fp"]
OURS = ["--method", "smoothquant", "--a_dynamic"]
SETTINGS = {
    "W8A8-per-token": ({"alpha": 0.5, "act_quant": "per_token"},
                       [*OURS, "--a_dynamic_method", "per_token"]),
    "W8A8-per-token-alpha0.8": ({"alpha": 0.8, "act_quant": "per_token"},
                                [*OURS, "--a_dynamic_method", "per_token", "--smooth_alpha", "0.8"]),
    "W8A8-per-token-no-smoothing": ({"alpha": None, "act_quant": "per_token"},
                                    [*OURS, "--a_dynamic_method", "per_token", "--transforms", ""]),
}


class _Windows:
    """What calibration.py reads through `datasets` and the tokenizer: sample i is calibration window i."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def shuffle(self, seed):  # the order of the samples does not change a running maximum
        return self

    def __getitem__(self, i):
        return {"text": i}

    def tokenizer(self, i, **_):
        return types.SimpleNamespace(input_ids=self.windows[i].unsqueeze(0))


def run_setting(code_dir: Path, model_dir: Path, calib: torch.Tensor, evaluation: torch.Tensor,
                settings: dict | None) -> float:
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    if settings is not None:
        windows = _Windows(calib)
        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=lambda *a, **k: windows)
        sys.path.insert(0, str(code_dir))
        from smoothquant.calibration import get_act_scales
        from smoothquant.fake_quant import quantize_opt
        from smoothquant.smooth import smooth_lm

        if settings["alpha"] is not None:
            with torch.no_grad():
                scales = get_act_scales(model, windows.tokenizer, "fixture", calib.shape[0], calib.shape[1])
            smooth_lm(model, scales, settings["alpha"])
        model = quantize_opt(model, weight_quant="per_channel", act_quant=settings["act_quant"],
                             quantize_bmm_input=True)
    return perplexity(model, evaluation)


def main() -> None:
    args = parser(__doc__, "mit-han-lab/smoothquant", "tests/parity/smoothquant.json").parse_args()

    def measure(code_dir, model_dir, calib, evaluation, name, theirs):
        return {"ppl": run_setting(code_dir, model_dir, calib, evaluation, theirs)}

    run_all(args, "mit-han-lab/smoothquant", SETTINGS, measure, ignore=("assets", "figures", "act_scales"),
            notes=("`datasets` replaced at run time by the fixture's calibration windows (calibration.py "
                   "tokenizes window i for sample i)",), shared_flags=SHARED_FLAGS, modules=("smoothquant", "datasets"))


if __name__ == "__main__":
    main()
