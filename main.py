"""RPTQ toolkit command line: `python main.py MODEL [options]` (flag names follow RPTQ's main.py)."""
from __future__ import annotations

import argparse
import sys

BITS = (2, 3, 4, 5, 6, 7, 8, 16)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line naming the problem, exit code 2 (argparse would print the usage too)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__)
    p.add_argument("model", help="opt-125m ... opt-175b, smollm2-135m, a hub id, or a local HF model directory")
    p.add_argument("--wbits", type=int, default=4, choices=BITS)
    p.add_argument("--abits", type=int, default=4, choices=BITS)
    p.add_argument("--only_quant_kv", action="store_true", help="quantize only K and V activations")
    p.add_argument("--abits_policy", default="rptq", choices=("rptq", "uniform"),
                   help="rptq: LN outputs and softmax at max(8, abits); uniform: all at abits, softmax at 16")
    p.add_argument("--eval_ppl", action="store_true")
    p.add_argument("--ppl_datasets", default="wikitext2,ptb,c4",
                   help="comma list of wikitext2, ptb, c4, wiki_leads, file:PATH")
    p.add_argument("--tasks", default="", help="comma list of lm-eval tasks, e.g. piqa,arc_easy")
    p.add_argument("--tasks_source", default="auto", choices=("auto", "hub", "local"))
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=-1, help="evaluate only the first N windows / documents")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=None, help="default: the model's max positions")
    p.add_argument("--calib_dataset", default="mix", help="mix, wikitext2, ptb, c4, wiki_leads or file:PATH")
    p.add_argument("--seed", type=int, default=2)
    for i, k in zip(range(1, 6), (32, 4, 4, 32, 32)):
        p.add_argument(f"--R{i}_clusters", type=int, default=k)
    p.add_argument("--reorder", default="12345", help='reorder points to cluster, e.g. 12345, 1, or "" for none')
    p.add_argument("--metric", default="ema_minmax", choices=("ema_minmax", "minmax"))
    p.add_argument("--a_dynamic", action="store_true", help="dynamic per-token activation ranges")
    p.add_argument("--w_quantizer", default="gptq", choices=("gptq", "rtn"))
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--disable_w_quant", action="store_true")
    p.add_argument("--disable_a_quant", action="store_true")
    p.add_argument("--multigpu", action="store_true", help="shard decoder layers over all visible GPUs")
    p.add_argument("--offload_dir", default=None,
                   help="out-of-core: read one layer at a time from the checkpoint, write quantized blocks here")
    p.add_argument("--max_memory", type=float, default=None, metavar="GIB",
                   help="memory this run may use (default: what is free); a model that does not fit in it is "
                        "calibrated out of core automatically")
    p.add_argument("--save_quantized", default=None, help="write the fused, quantized model to this directory")
    p.add_argument("--load_quantized", default=None, help="evaluate a --save_quantized directory (no calibration)")
    p.add_argument("--no_resume", action="store_true",
                   help="do not keep per-layer calibration state in OUTPUT_PATH/calibration_state")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--output_path", default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def build_config(args):
    from rptq.config import QuantConfig
    from rptq.errors import UserError
    from rptq.runner import RunConfig

    if args.nsamples < 1:
        raise UserError(f"--nsamples must be at least 1 (got {args.nsamples})")
    if args.seqlen is not None and args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {args.seqlen})")
    if args.num_fewshot < 0:
        raise UserError(f"--num_fewshot must be 0 or more (got {args.num_fewshot})")
    if args.limit == 0 or args.limit < -1:
        raise UserError(f"--limit must be a positive count or -1 for all (got {args.limit})")
    if args.percdamp <= 0:
        raise UserError(f"--percdamp must be positive (got {args.percdamp})")
    if any(c not in "12345" for c in args.reorder) or len(set(args.reorder)) != len(args.reorder):
        raise UserError(f"--reorder takes distinct digits 1-5 such as 12345 or 14 (got {args.reorder!r})")
    if args.max_memory is not None and args.max_memory <= 0:
        raise UserError(f"--max_memory is in GiB and must be positive (got {args.max_memory})")
    clusters = {f"R{i}": getattr(args, f"R{i}_clusters") for i in range(1, 6)}
    for point, count in clusters.items():
        if count < 1:
            raise UserError(f"--{point}_clusters must be at least 1 (got {count})")
    quant = QuantConfig(wbits=args.wbits, abits=args.abits, only_quant_kv=args.only_quant_kv,
                        abits_policy=args.abits_policy, reorder=args.reorder, clusters=clusters, metric=args.metric,
                        a_dynamic=args.a_dynamic, w_quantizer=args.w_quantizer, percdamp=args.percdamp,
                        disable_w_quant=args.disable_w_quant, disable_a_quant=args.disable_a_quant, seed=args.seed)
    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    ppl_datasets = split(args.ppl_datasets)
    if args.eval_ppl and not ppl_datasets:
        raise UserError("--eval_ppl needs at least one dataset in --ppl_datasets (e.g. ptb)")
    return RunConfig(model=args.model, quant=quant, eval_ppl=args.eval_ppl, ppl_datasets=ppl_datasets,
                     tasks=split(args.tasks), tasks_source=args.tasks_source, num_fewshot=args.num_fewshot,
                     limit=args.limit, nsamples=args.nsamples, seqlen=args.seqlen, calib_dataset=args.calib_dataset,
                     cache_dir=args.cache_dir, output_path=args.output_path, device=args.device,
                     offload_dir=args.offload_dir, save_quantized=args.save_quantized,
                     load_quantized=args.load_quantized, multigpu=args.multigpu, max_memory_gib=args.max_memory,
                     resume=not args.no_resume, progress=not args.no_progress)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rptq.errors import UserError

    try:
        from models.hub import configure_hub

        configure_hub()  # before any hub lookup: offline mode when it cannot be reached
        from rptq.runner import run

        run(build_config(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
