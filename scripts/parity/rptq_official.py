"""Run the official RPTQ code (hahnyuan/RPTQ4LLM) on the parity fixture and record its figures.

Runs in a scratch environment outside the project (the official code wants transformers 4.29; this project
pins 5.x), on CPU, fed the fixture's windows (scripts/parity/fixture.py) instead of its own data loaders:

    /tmp/refenv/bin/python scripts/parity/rptq_official.py --repo /tmp/ref/rptq4llm \\
        --fixture /tmp/parity-fixture --out tests/parity/rptq.json

--repo is a checkout of the official repository (nothing of it enters this project). The script copies it to a
temporary directory, applies the changes listed in PATCHES (printed, and recorded in the JSON), imports its
quantization function (quantize/opt_reorder_quantize.py) with the arguments its main.py would build, and
measures perplexity with its own evaluation loop's arithmetic over the given windows. The JSON holds, per
setting, the official perplexity, the flags that give the same semantics here, and what each flag stands for.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from official import WeightErrors, forget, parser, perplexity, run_all

# (file, text, replacement, why): the smallest change that runs the official code on CPU in fp32.
PATCHES = (
    ("quantize/quant_transformer_layer.py", 'module.register_buffer("weight", fake_quantized_weight.half())',
     'module.register_buffer("weight", fake_quantized_weight)',
     "GPTQ's fake-quantized weight is stored in fp16, the GPU model's dtype; here it stays in the fp32 model's "
     "dtype (an fp32 input cannot multiply an fp16 weight on CPU)"),
)
# torch.cuda calls the official code makes unconditionally (cache flushes, memory prints, a synchronize).
CUDA_NO_OPS = ("empty_cache", "synchronize", "memory_allocated", "max_memory_allocated")

# name -> (the official main.py's flags, this project's flags with the same semantics). The reference grid
# with the reference code's clamps (--grid reference_clamped) is what the official quantizer computes; the
# other reference defaults (k-means seed 0, label order, softmax grid in calibration, next block's inputs)
# are this project's defaults already.
SETTINGS = {
    "W16A4-per-tensor": ({"wbits": 16, "abits": 4, "reorder": ""}, ["--wbits", "16", "--abits", "4", "--reorder", ""]),
    "W4A16-per-tensor": ({"wbits": 4, "abits": 16, "reorder": ""}, ["--wbits", "4", "--abits", "16", "--reorder", ""]),
    "W4A4-per-tensor": ({"wbits": 4, "abits": 4, "reorder": ""}, ["--wbits", "4", "--abits", "4", "--reorder", ""]),
    "W3A3-per-tensor": ({"wbits": 3, "abits": 3, "reorder": ""}, ["--wbits", "3", "--abits", "3", "--reorder", ""]),
    "W16A4": ({"wbits": 16, "abits": 4}, ["--wbits", "16", "--abits", "4"]),
    "W4A16": ({"wbits": 4, "abits": 16}, ["--wbits", "4", "--abits", "16"]),
    "W4A4": ({"wbits": 4, "abits": 4}, ["--wbits", "4", "--abits", "4"]),
    "W3A3": ({"wbits": 3, "abits": 3}, ["--wbits", "3", "--abits", "3"]),
    "W4A3KV": ({"wbits": 4, "abits": 3, "only_quant_kv": True}, ["--wbits", "4", "--abits", "3", "--only_quant_kv"]),
}
SHARED_FLAGS = ["--grid", "reference_clamped"]
OFFICIAL_MODULES = ("quantize", "models")  # it keeps module-level dicts: imported afresh for every run


def official_args(settings: dict, nsamples: int) -> SimpleNamespace:
    """The namespace the official main.py builds for these flags (its defaults otherwise)."""
    a = SimpleNamespace(nsamples=nsamples, percdamp=0.01, seed=2, metric="ema_minmax", wbits=4, abits=4,
                        disable_w_quant=False, disable_a_quant=False, R1_clusters=32, R2_clusters=4, R3_clusters=4,
                        R4_clusters=32, R5_clusters=32, reorder="12345", w_quantizer="gptq", a_dynamic=False,
                        only_quant_kv=False, pack_weight=False, multigpu=False, batch_size=1)
    for k, v in settings.items():
        setattr(a, k, v)
    act = lambda bits: {"n_bits": bits, "per_channel_axes": [], "symmetric": False,  # noqa: E731
                        "metric": a.metric, "dynamic": a.a_dynamic}
    a.weight_quant_params = {"n_bits": a.wbits, "per_channel_axes": [0], "symmetric": False, "metric": "minmax"}
    a.act_quant_params = act(16 if a.only_quant_kv else a.abits)
    a.q_quant_params = act(16 if a.only_quant_kv else a.abits)
    a.k_quant_params = act(a.abits)
    a.v_quant_params = act(a.abits)
    a.layer_norm_out_quant_params = act(16 if a.only_quant_kv else max(8, a.abits))
    a.p_quant_params = {"n_bits": 16 if a.only_quant_kv else max(8, a.abits), "metric": "fix0to1"}
    return a


LINEARS_PER_LAYER = 6  # q, k, v, out_proj, fc1, fc2: the official GPTQ quantizes each OPT layer's six in turn


def run_setting(code_dir: Path, model_dir: Path, calib: torch.Tensor, evaluation: torch.Tensor,
                settings: dict | None, kmeans_seed: int = 0) -> tuple[float, list[float]]:
    """The official perplexity of one setting (None: the unquantized model) and, per layer, GPTQ's relative
    weight error sum ||Q - W||^2 / sum ||W||^2 over its linears (empty when weights stay FP). ``kmeans_seed``
    replaces the official k-means random_state (0) to measure how far the seed alone moves its figure."""
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    errors = WeightErrors(LINEARS_PER_LAYER)
    if settings is not None:
        sys.path.insert(0, str(code_dir))
        import quantize.gptq as gptq
        import quantize.reorder_utils as reorder_utils
        from quantize.opt_reorder_quantize import opt_reorder_quantize

        fasterquant = gptq.GPTQ.fasterquant

        def measured(self, *a, **k):  # observes GPTQ's input and output weights; changes nothing
            weight = self.layer.weight.data.float().clone()
            q, loss = fasterquant(self, *a, **k)
            errors.add(weight, q)
            return q, loss

        gptq.GPTQ.fasterquant = measured

        if kmeans_seed != 0:
            official = reorder_utils.KMeans
            reorder_utils.KMeans = lambda *a, **k: official(*a, **{**k, "random_state": kmeans_seed})

        args = official_args(settings, calib.shape[0])
        torch.manual_seed(args.seed)
        lm = SimpleNamespace(model=model, device="cpu", _device="cpu", seqlen=calib.shape[1])
        clusters = {f"R{i}": getattr(args, f"R{i}_clusters") for i in range(1, 6)}
        opt_reorder_quantize(lm, args, [(w.unsqueeze(0),) for w in calib], clusters, args.reorder)
        for layer in model.model.decoder.layers:
            layer.set_quant_state(not args.disable_w_quant, not args.disable_a_quant)
    return perplexity(model, evaluation), errors.by_layer()


def main() -> None:
    ap = parser(__doc__, "hahnyuan/RPTQ4LLM", "tests/parity/rptq.json")
    ap.add_argument("--kmeans_seeds", default="0,1,2,3,4",
                    help="k-means random_states to run each clustered setting with (the official code's is 0)")
    args = ap.parse_args()
    kmeans_seeds = [int(s) for s in args.kmeans_seeds.split(",")]
    if kmeans_seeds[0] != 0:
        raise SystemExit("--kmeans_seeds must start with 0, the official code's own seed")

    def measure(code_dir, model_dir, calib, evaluation, name, theirs):
        seeds = kmeans_seeds if theirs is not None and theirs.get("reorder", "12345") else [0]
        by_seed, weight_errors = {}, []
        for seed in seeds:
            by_seed[str(seed)], errors = run_setting(code_dir, model_dir, calib, evaluation, theirs, seed)
            weight_errors = weight_errors or errors  # k-means seed 0's
            print(f"{name:28s} k-means seed {seed}: ppl {by_seed[str(seed)]!r}")
            forget(OFFICIAL_MODULES)
        return {"ppl": by_seed["0"], **({"ppl_by_kmeans_seed": by_seed} if len(seeds) > 1 else {}),
                **({"gptq_weight_error_by_layer": weight_errors} if weight_errors else {})}

    run_all(args, "hahnyuan/RPTQ4LLM", SETTINGS, measure, patches=PATCHES, cuda_no_ops=CUDA_NO_OPS,
            ignore=("lm_evaluation",), shared_flags=SHARED_FLAGS, modules=OFFICIAL_MODULES)


if __name__ == "__main__":
    main()
