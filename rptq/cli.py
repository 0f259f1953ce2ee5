"""The command line's parser: every flag of `python main.py`, the shared ones here and each method's from its
settings (rptq.flags.add_method_flags); docgen.cli_reference renders docs/cli.md from it."""
from __future__ import annotations

import argparse

from quant.grid import GRIDS

from . import methods
from .config import BLOCK_INPUTS
from .flags import PPL_DEFAULT, add_method_flags
from .stats import METRICS

BITS = (2, 3, 4, 5, 6, 7, 8, 16)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line naming the problem, exit code 2 (argparse would print the usage too)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="main.py", description="RPTQ toolkit command line: `python main.py MODEL [options]` "
                                                  "(flag names follow RPTQ's main.py).")
    p.add_argument("model", help="opt-125m ... opt-175b, smollm2-135m, gemma3-270m, a hub id, or a local HF model "
                                  "directory")
    p.add_argument("--method", default="rptq", choices=methods.method_names(),
                   help="preset by paper name; expands to the settings in the README, each overridable by its flag")
    p.add_argument("--transforms", default=None,
                   help=f"transform steps in order, comma list of {','.join(methods.steps())} (default: the method's)")
    p.add_argument("--wbits", type=int, default=None, choices=BITS, help="default 4 (smoothquant: 8)")
    p.add_argument("--abits", type=int, default=None, choices=BITS, help="default 4 (smoothquant, fptq: 8)")
    p.add_argument("--only_quant_kv", action="store_true", help="quantize only K and V activations")
    p.add_argument("--abits_policy", default=None, choices=tuple(methods.policies()),
                   help="activation policy (default: the method's); rptq: LayerNorm outputs at max(8, abits), "
                        "softmax on a fixed 1/255 grid; uniform: all at abits, softmax at 16")
    p.add_argument("--eval_ppl", action="store_true", help="perplexity on --ppl_datasets after calibration")
    p.add_argument("--eval_base_ppl", action="store_true",
                   help="also the perplexity of the unquantized model, in the same run")
    p.add_argument("--ppl_datasets", default=None,
                   help=f"comma list of wikitext2, ptb, c4, wiki_leads, file:PATH (default {PPL_DEFAULT})")
    p.add_argument("--tasks", default="", help="comma list of lm-eval tasks, e.g. piqa,arc_easy")
    p.add_argument("--tasks_source", default="auto", choices=("auto", "hub", "local"),
                   help="where zero-shot task data comes from: the hub, the offline mirrors, or the hub when reachable")
    p.add_argument("--task_bos", default="auto", choices=("auto", "on", "off"),
                   help="BOS before lm-eval contexts; auto: none for OPT (as the reference), the model's own otherwise")
    p.add_argument("--num_fewshot", type=int, default=0, help="few-shot examples per lm-eval task")
    p.add_argument("--limit", type=int, default=-1, help="evaluate only the first N windows / documents")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of --seqlen tokens")
    p.add_argument("--seqlen", type=int, default=None, help="default: min(the model's max positions, 2048)")
    p.add_argument("--calib_dataset", default="mix", help="mix, wikitext2, ptb, c4, wiki_leads or file:PATH")
    p.add_argument("--seed", type=int, default=2, help="0 .. 2^32-1 (k-means' random_state range)")
    p.add_argument("--metric", default="ema_minmax", choices=METRICS,
                   help="static activation ranges: ema_minmax (reference: EMA of each sample's cluster extreme), "
                        "minmax, ema_channel (EMA per channel), mse / layer_mse (clipping searches)")
    p.add_argument("--a_dynamic", action="store_true", help="dynamic activation ranges")
    p.add_argument("--a_dynamic_method", default="per_cluster", choices=("per_cluster", "per_token"),
                   help="per_cluster: one range per cluster and sequence (reference); per_token: per token and cluster")
    p.add_argument("--act_clip", type=float, default=None,
                   help="dynamic activation clipping ratio (duquant, quarot: 0.9; spinquant: 1.0)")
    p.add_argument("--grid", default=None, choices=GRIDS,
                   help="integer grid: reference (RPTQ: 2^b levels over [min, max-step]), reference_clamped (the "
                        "same with the reference code's scale/zero clamps, which clip |w| > 1 in single-channel "
                        "clusters), full (2^b-1 steps over "
                        "[min, max]), symmetric (codes +-(2^(b-1)-1)), quarot (symmetric scale on codes -2^(b-1)..2^(b-1)-1)")
    p.add_argument("--w_quantizer", default=None, choices=("gptq", "rtn", "normal", "gptqt", "bcq"),
                   help="normal = rtn (the reference's name); gptqt: GPTQT binary codes (3/2 bits); bcq: plain "
                        "binary coding (greedy + alternating)")
    p.add_argument("--w_range", default=None, choices=("minmax", "with_zero"),
                   help="weight ranges: plain min/max (reference) or forced to include 0 (GPTQ)")
    p.add_argument("--w_group_size", type=int, default=None,
                   help="0: per row (per input cluster where reordered); N: groups of N input channels")
    p.add_argument("--w_clip", default=None, metavar="RATIO|search|learned",
                   help="weight range clipping: a ratio in (0, 1] (duquant: 0.8), search (QuaRot's per-row search; "
                        "quarot, spinquant) or learned (per-row clipping trained on the block output, LWC)")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ's Hessian damping, a fraction of its mean diagonal")
    p.add_argument("--act_order", action="store_true",
                   help="GPTQ quantizes the columns by decreasing Hessian diagonal, each keeping its group's scale "
                        "(GPTQ's --act-order --static-groups; llm-compressor's default); off: the paper's order")
    p.add_argument("--gptq_order", default=None, choices=("together", "sequential"),
                   help="GPTQ's Hessians: together, every linear's from the block's one FP pass (default; GPTQ's opt.py, "
                        "RPTQ), or sequential, one input's readers after another in block order, each next input's "
                        "Hessian measured anew through those quantized so far (quarot, spinquant; GPTQ's llama.py "
                        "--true-sequential)")
    p.add_argument("--block_inputs", default=None, choices=BLOCK_INPUTS,
                   help="what the next block calibrates on: this block's quantized outputs (default), its full-"
                        "precision ones (flatquant; duquant, whose official code measures its smoothing statistics on the "
                        "FP model), or the quantized ones only where weights are quantized (weights: "
                        "rptq, as the reference)")
    p.add_argument("--disable_w_quant", action="store_true", help="keep the weights in full precision (the reference's flag)")
    p.add_argument("--disable_a_quant", action="store_true",
                   help="keep the activations in full precision (the reference's flag)")
    p.add_argument("--multigpu", action="store_true", help="shard decoder layers over all visible GPUs")
    p.add_argument("--offload_dir", default=None,
                   help="out-of-core: read one layer at a time from the checkpoint, write quantized blocks here")
    p.add_argument("--max_memory", type=float, default=None, metavar="GIB",
                   help="memory this run may use (default: what is free); a model that does not fit in it is "
                        "calibrated out of core automatically")
    p.add_argument("--save_quantized", default=None, help="write the fused, quantized model to this directory")
    p.add_argument("--pack_weight", action="store_true",
                   help="the reference's flag: store packed low-bit weights (with --save_quantized)")
    p.add_argument("--scale_format", default=None, choices=("exact", "fp16", "sf8"),
                   help="weight scales: exact fp32 (default), fp16 numbers (= --pack_weight), or sf8: 1 byte, rounded "
                        "up to 5 significant bits (smallest checkpoints; changes the numbers)")
    p.add_argument("--load_quantized", "--load", dest="load_quantized", default=None,
                   help="evaluate a --save_quantized directory (no calibration); --load is the reference's name")
    p.add_argument("--export", nargs=2, default=None, metavar=("FORMAT", "DIR"),
                   help="also write the quantized model as a Hugging Face directory that transformers and vLLM load; "
                        "FORMAT: compressed-tensors")
    p.add_argument("--act_dist_plot", action="store_true", help="draw activation ranges before/after the transforms")
    p.add_argument("--plot_layers", default="0,mid,-1", help="layers to draw with --act_dist_plot")
    p.add_argument("--no_resume", action="store_true",
                   help="do not keep per-layer calibration state in OUTPUT_PATH/calibration_state")
    p.add_argument("--cache_dir", default=None, help="Hugging Face cache directory for models and datasets")
    p.add_argument("--output_path", default=None,
                   help="where results.json, the plots and the resumable calibration state go")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    add_method_flags(p)
    return p


def given_flags(argv=None) -> frozenset[str]:
    """The options set on the command line, not defaulted: --load_quantized refuses those that contradict
    the checkpoint (a default is not a contradiction)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))
