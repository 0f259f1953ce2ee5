"""Run the official FlatQuant code (ruikangliu/FlatQuant) on the tiny Llama parity fixture and record its figures.

Runs in a scratch environment outside the project (FlatQuant pins transformers 4.45.0; this project pins 5.x), on
CPU in fp32 (its --deactive_amp), fed the fixture's windows (scripts/parity/fixture.py --model tiny-llama):

    /tmp/flenv/bin/python scripts/parity/flatquant_official.py --repo /tmp/ref/flatquant \\
        --fixture /tmp/parity-llama --out tests/parity/flatquant.json

--repo is a checkout of the official repository (nothing of it enters this project). The script copies it to a
temporary directory, applies the changes listed in PATCHES (printed, and recorded in the JSON) and calls its main.py's
main() unchanged with the README's W4A4KV4 flags; only its data loaders (the fixture's windows), its tokenizer (none
is needed then) and its perplexity evaluation (the same arithmetic over the fixture's evaluation windows) are
replaced, and its model loader returns the fixture's model (--model accepts only its list of names: it is given
Llama-3.1-8B's, whose code path runs under the pinned transformers) at the windows' sequence length (256, not 2048).

Every FlatQuant figure depends on its seed: the Kronecker factors start as random orthogonal matrices drawn from
numpy's global generator (seed_everything(--seed)), and training follows. Each setting runs over seeds 0-4 and ours
is compared with that spread.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from official import argv, forget, perplexity, run_seeded

PATCHES = (
    ("flatquant/model_tools/llama31_utils.py", ").cuda() * 1e-5", ") * 1e-5",
     "the smoothing statistics' floors are made on the GPU; here on the CPU"),
)
CUDA_NO_OPS = ("synchronize", "empty_cache")
OFFICIAL_MODULES = ("flatquant", "gptq_utils", "main")
NOTES = ("--deactive_amp: training in fp32 (its default autocasts to fp16 on the GPU)",)

# The README's W4A4KV4 command (K/V groups of this head_dim, 64), on the fixture's 32 windows, in fp32
README = {"w_bits": 4, "a_bits": 4, "k_bits": 4, "k_asym": True, "k_groupsize": 64, "v_bits": 4, "v_asym": True,
          "v_groupsize": 64, "cali_bsz": 4, "epochs": 15, "flat_lr": 5e-3, "lwc": True, "lac": True,
          "cali_trans": True, "add_diag": True, "deactive_amp": True}
OURS = ["--method", "flatquant"]
# name -> (the official flags that differ from README, this project's flags with the same semantics)
SETTINGS = {
    "W4A4KV4-no-training": ({"epochs": 0}, OURS + ["--flat_epochs", "0"]),
    "W4A4KV4": ({}, OURS + ["--flat_epochs", "15"]),  # the README's flags as they are
}
# --model takes only its list; the loader returns the fixture. Its Llama-3.1 path (llama31_utils.py): the plain Llama
# path (llama_utils.py) calls RoPE with transformers 4.36's signature and fails under the pinned 4.45.
MODEL_CHOICE = "./modelzoo/meta-llama/Llama-3.1-8B"
ROTATED = set(SETTINGS)  # every figure depends on the seed (random orthogonal initial factors)


def flag_line(flags: dict) -> list[str]:
    """main.py's command line (its booleans are store_true: only the true ones appear)."""
    return argv({k: v for k, v in flags.items() if v is not False})


def run(code_dir: Path, model_dir: Path, calib: torch.Tensor, evaluation: torch.Tensor, flags: dict | None,
        seed: int, jitter: int = 0) -> tuple[float, list[float]]:
    """Official main.main() with ``flags`` (None: the model unquantized) and --seed ``seed``: (perplexity, [])."""
    import transformers

    if flags is None:
        return perplexity(transformers.LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
                          .eval(), evaluation), []
    sys.path.insert(0, str(code_dir))
    saved_argv, saved_tokenizer, result = sys.argv, transformers.AutoTokenizer.from_pretrained, {}
    try:
        import flatquant.data_utils as data_utils
        import flatquant.eval_utils as eval_utils
        import flatquant.model_utils as model_utils
        import main

        get_llama = model_utils.get_llama_31

        def fixture_model(name, hf_token):  # the fixture's model, at the windows' length (not 2048)
            model, apply = get_llama(str(model_dir), hf_token)
            model.seqlen = calib.shape[1]
            return model, apply

        def evaluate(model, testenc):  # main evaluates wikitext2 then c4: both are the fixture's windows
            if "ppl" not in result:
                result["ppl"] = perplexity(model, evaluation)
            return result["ppl"]

        model_utils.get_llama_31 = fixture_model
        data_utils.get_loaders = lambda args, name, tok, nsamples=128, seqlen=2048, eval_mode=False: (
            None if eval_mode else [(w.unsqueeze(0), None) for w in calib])
        eval_utils.ppl_eval = evaluate
        transformers.AutoTokenizer.from_pretrained = lambda *a, **k: None  # the loaders above need none
        with tempfile.TemporaryDirectory() as out:
            sys.argv = ["main.py", "--model", MODEL_CHOICE, "--seed", str(seed), "--nsamples", str(len(calib)),
                        "--output_dir", out, *flag_line({**README, **flags})]
            main.main()
    finally:
        sys.argv = saved_argv
        transformers.AutoTokenizer.from_pretrained = saved_tokenizer
        forget(OFFICIAL_MODULES)
        sys.path.remove(str(code_dir))
    return result["ppl"], []


def main() -> None:
    run_seeded(__doc__, "ruikangliu/FlatQuant", "tests/parity/flatquant.json", run, SETTINGS, ROTATED,
               patches=PATCHES, cuda_no_ops=CUDA_NO_OPS, modules=OFFICIAL_MODULES, notes=NOTES,
               ignore=("deploy", "third-party", "deepseek_v3", "benchmarks", "*.png", "*.jpg"))


if __name__ == "__main__":
    main()
