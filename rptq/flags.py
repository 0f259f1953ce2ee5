"""The command line's parsed flags as a run's settings: the --method preset first, then every flag
given explicitly; contradictions, out-of-range values and flags the run would ignore are refused
with one line (main.py parses, this decides)."""
from __future__ import annotations

import dataclasses

from common.errors import UserError

from .config import (DEFAULT_CLUSTERS, FPTQSettings, GPTQTSettings, QuantConfig, ResidualSettings, RotationSettings,
                     SmoothSettings, SpinSettings)
from .export_rules import FORMATS as EXPORT_FORMATS
from .methods import PRESETS, STEPS
from .run_config import RunConfig

PPL_DEFAULT = "wikitext2,ptb,c4"
# GPTQT enumerates every level set on the inter_bits grid (quant/level_sets.py), ~16x more per bit: for 3-bit
# codes 441 at 4 bits, 116281 at 6 (measured: 14 s, 2 GB peak on the 2-core dev box), 1.9 million at 7 (~30 GB;
# `--inter_bits 12` was OOM-killed at 23 GB). 6 is the largest that runs on a workstation.
MAX_INTER_BITS = 6


def quant_config(args):
    """QuantConfig from the method preset, then every flag given explicitly."""
    preset = dict(PRESETS[args.method])
    smooth = {**dataclasses.asdict(SmoothSettings()), **preset.pop("smooth", {})}
    rotation = {**dataclasses.asdict(RotationSettings()), **preset.pop("rotation", {})}
    residual = {**dataclasses.asdict(ResidualSettings()), **preset.pop("residual", {})}
    base = {**dataclasses.asdict(QuantConfig()), **preset}
    for flag in ("wbits", "abits", "abits_policy", "grid", "w_range", "w_group_size", "w_clip"):
        if getattr(args, flag) is not None:
            base[flag] = getattr(args, flag)
    if args.w_quantizer is not None:
        base["w_quantizer"] = "rtn" if args.w_quantizer == "normal" else args.w_quantizer
    if args.transforms is not None:
        steps = tuple(s.strip() for s in args.transforms.split(",") if s.strip())
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise UserError(f"unknown transform step {unknown[0]!r}; steps: {', '.join(STEPS)}")
        base["transforms"] = steps
    transforms = base["transforms"]
    if args.reorder is not None or any(getattr(args, f"R{i}_clusters") is not None for i in range(1, 6)):
        if "reorder" not in transforms:
            raise UserError(f"--reorder/--R*_clusters cluster channels, but --method {args.method} runs no reorder "
                            f"step (its transforms: {','.join(transforms) or 'none'}); add it with --transforms")
    if args.reorder is not None:
        base["reorder"] = args.reorder
    base["clusters"] = {k: getattr(args, f"{k}_clusters") or v for k, v in DEFAULT_CLUSTERS.items()}
    if (args.smooth_alpha is not None or args.smooth_points is not None) and "smooth" not in transforms:
        raise UserError("--smooth_alpha/--smooth_points set SmoothQuant's scales; add smooth to --transforms "
                        f"(--method {args.method} runs: {','.join(transforms) or 'none'})")
    if args.smooth_alpha is not None:
        smooth["alpha"] = args.smooth_alpha
    if args.smooth_points is not None:
        smooth["points"] = args.smooth_points
    if args.rotation is not None:
        if "rotate" not in transforms:
            raise UserError(f"--rotation needs the rotate step; --method {args.method} runs: {','.join(transforms)}")
        rotation["kind"] = args.rotation
    rotation.update(permute=not args.no_permute, outlier_index=args.outlier_index,
                    **{k: v for k, v in (("block_size", args.rotation_block), ("steps", args.rotation_steps))
                       if v is not None})
    if args.act_clip is not None:
        rotation["act_clip"] = args.act_clip
    if base["abits_policy"] == "fptq" and "lae" not in transforms:
        raise UserError("--abits_policy fptq routes each point by the lae step's decisions; add lae to --transforms")
    if base["w_quantizer"] in ("gptqt", "bcq") and base["wbits"] not in (2, 3):
        raise UserError(f"--w_quantizer {base['w_quantizer']} makes 3- or 2-bit binary codes; use --wbits 3 or 2 "
                        f"(got {base['wbits']})")
    for name, value in (("--w_group_size", base["w_group_size"]), ("--rotation_block", rotation["block_size"]),
                        ("--rotation_steps", rotation["steps"])):
        if value < 0 or (name == "--rotation_block" and value < 2):
            raise UserError(f"{name} must be {'at least 2' if name == '--rotation_block' else 'non-negative'} "
                            f"(got {value})")
    for name, value in (("--w_clip", base["w_clip"]), ("--act_clip", rotation["act_clip"]),
                        ("--smooth_alpha", smooth["alpha"])):
        if not 0 < value <= 1:
            raise UserError(f"{name} must be in (0, 1] (got {value})")
    if args.pack_weight and args.scale_format == "exact":
        raise UserError("--pack_weight stores fp16 weight scales; it contradicts --scale_format exact (drop one)")
    scale_format = args.scale_format or ("fp16" if args.pack_weight else "exact")
    base.update(method=args.method, only_quant_kv=args.only_quant_kv, metric=args.metric,
                kmeans_features=args.kmeans_features, a_dynamic=args.a_dynamic,
                a_dynamic_method=args.a_dynamic_method, percdamp=args.percdamp,
                disable_w_quant=args.disable_w_quant, disable_a_quant=args.disable_a_quant, seed=args.seed,
                fp16_scales=scale_format == "fp16", sf8_scales=scale_format == "sf8")
    base["smooth"] = SmoothSettings(**smooth)
    base["rotation"] = RotationSettings(**rotation)
    fptq = {k: v for k, v in (("v0", args.fptq_v0), ("v1", args.fptq_v1), ("kv_bits", args.kv_bits)) if v is not None}
    base["fptq"] = FPTQSettings(**fptq)
    if args.residual_rotation is not None and "residual_rotate" not in transforms:
        raise UserError(f"--residual_rotation chooses R1 of the residual_rotate step; --method {args.method} runs: "
                        f"{','.join(transforms)} (add residual_rotate to --transforms)")
    base["residual"] = ResidualSettings(**{**residual, "kind": args.residual_rotation or "hadamard"})
    base["spin"] = spin_settings(args, transforms)
    base["gptqt"] = GPTQTSettings(inter_bits=args.inter_bits, variant=args.gptqt_variant or "B")
    quant = QuantConfig(**base)
    refuse_unused(args, quant)
    return quant


def spin_settings(args, transforms: tuple[str, ...]) -> SpinSettings:
    """--spin_steps/--spin_lr/--spin_samples, only with the spin_rotate step, which learns the R1 that
    residual_rotate folds (so it needs that step)."""
    given = {k: v for k in ("steps", "lr", "samples") if (v := getattr(args, f"spin_{k}")) is not None}
    if given and "spin_rotate" not in transforms:
        raise UserError(f"--spin_{next(iter(given))} sets SpinQuant's learning of R1/R2 (the spin_rotate step); "
                        f"--method {args.method} runs: {','.join(transforms)} (use --method spinquant)")
    if "spin_rotate" in transforms and "residual_rotate" not in transforms:
        raise UserError("the spin_rotate step learns the R1 that residual_rotate folds; add residual_rotate to "
                        "--transforms")
    spin = SpinSettings(**{"samples": min(SpinSettings.samples, args.nsamples), **given})
    if spin.steps < 0 or spin.samples < 1 or not spin.lr > 0:
        raise UserError(f"--spin_steps must be 0 or more, --spin_samples at least 1 and --spin_lr positive (got "
                        f"{spin.steps}, {spin.samples}, {spin.lr})")
    if "spin_rotate" in transforms and spin.samples > args.nsamples:
        raise UserError(f"--spin_samples {spin.samples} exceeds the {args.nsamples} calibration windows "
                        "(--nsamples); lower it or raise --nsamples")
    return spin


def refuse_unused(args, quant: QuantConfig) -> None:
    """A flag the run would ignore, or a value it would silently change, is an error (issue #20)."""
    for flag, given, needs, active in (
            ("--inter_bits", args.inter_bits or None, "--w_quantizer gptqt", quant.w_quantizer == "gptqt"),
            ("--gptqt_variant", args.gptqt_variant, "--w_quantizer gptqt", quant.w_quantizer == "gptqt"),
            ("--fptq_v0", args.fptq_v0, "the lae step", "lae" in quant.transforms),
            ("--fptq_v1", args.fptq_v1, "the lae step", "lae" in quant.transforms),
            ("--kv_bits", args.kv_bits, "--abits_policy fptq", quant.abits_policy == "fptq"),
            ("--rotation_block", args.rotation_block, "the rotate step", "rotate" in quant.transforms),
            ("--rotation_steps", args.rotation_steps, "the rotate step", "rotate" in quant.transforms),
            ("--no_permute", args.no_permute or None, "the rotate step", "rotate" in quant.transforms),
            ("--outlier_index", None if args.outlier_index == "official" else args.outlier_index,
             "the rotate step", "rotate" in quant.transforms),
            ("--act_clip", args.act_clip, "--abits_policy duquant, quarot or spinquant",
             quant.abits_policy in ("duquant", "quarot", "spinquant"))):
        if given is not None and not active:
            raise UserError(f"{flag} is used only with {needs}; --method {quant.method} does not run it (drop the "
                            "flag or add what it needs)")
    for i in range(1, 6):
        if getattr(args, f"R{i}_clusters") is not None and not quant.reorders(f"R{i}"):
            raise UserError(f"--R{i}_clusters is ignored: --reorder {quant.reorder!r} does not cluster R{i}; add {i} "
                            "to --reorder or drop the flag")
    block = quant.rotation.block_size
    if block & (block - 1):  # largest_pow2_block would silently use a smaller power of two
        raise UserError(f"--rotation_block must be a power of two (got {block}; e.g. {1 << (block.bit_length() - 1)})")
    if not 0 <= quant.fptq.v0 <= quant.fptq.v1:
        raise UserError(f"--fptq_v0 and --fptq_v1 need 0 <= v0 <= v1 (got {quant.fptq.v0}, {quant.fptq.v1})")
    if args.inter_bits and not quant.wbits < args.inter_bits <= MAX_INTER_BITS:
        raise UserError(f"--inter_bits must be in wbits + 1 .. {MAX_INTER_BITS} = {quant.wbits + 1} .. "
                        f"{MAX_INTER_BITS} (got {args.inter_bits}): GPTQT enumerates every level set on the "
                        "inter_bits grid: 116281 (2 GB) at 6 bits, 1.9 million (~30 GB) at 7")


def build_config(args):
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in 0 .. 2^32-1, k-means' random_state range (got {args.seed})")
    if args.ppl_datasets is not None and not (args.eval_ppl or args.eval_base_ppl):
        raise UserError("--ppl_datasets names the perplexity texts; add --eval_ppl (or --eval_base_ppl)")
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
    if args.reorder is not None and (any(c not in "12345" for c in args.reorder)
                                     or len(set(args.reorder)) != len(args.reorder)):
        raise UserError(f"--reorder takes distinct digits 1-5 such as 12345 or 14 (got {args.reorder!r})")
    if args.max_memory is not None and args.max_memory <= 0:
        raise UserError(f"--max_memory is in GiB and must be positive (got {args.max_memory})")
    for i in range(1, 6):
        count = getattr(args, f"R{i}_clusters")
        if count is not None and count < 1:
            raise UserError(f"--R{i}_clusters must be at least 1 (got {count})")
    if args.pack_weight and not args.save_quantized:
        raise UserError("--pack_weight stores packed weights in a --save_quantized directory; pass --save_quantized DIR")
    if args.export and args.export[0] not in EXPORT_FORMATS:
        raise UserError(f"--export {args.export[0]}: unknown format; one of {', '.join(EXPORT_FORMATS)}")
    quant = quant_config(args)
    if args.save_quantized and "residual_rotate" in quant.transforms:  # spinquant's too
        raise UserError("--save_quantized cannot yet store a residual-rotated model (its norms and head change "
                        "form); evaluate in the same run, or drop residual_rotate")
    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    ppl_datasets = split(PPL_DEFAULT if args.ppl_datasets is None else args.ppl_datasets)
    if (args.eval_ppl or args.eval_base_ppl) and not ppl_datasets:
        raise UserError("--eval_ppl needs at least one dataset in --ppl_datasets (e.g. ptb)")
    return RunConfig(model=args.model, quant=quant, eval_ppl=args.eval_ppl, eval_base_ppl=args.eval_base_ppl,
                     ppl_datasets=ppl_datasets, tasks=split(args.tasks), tasks_source=args.tasks_source,
                     task_bos=args.task_bos, num_fewshot=args.num_fewshot,
                     limit=args.limit, nsamples=args.nsamples, seqlen=args.seqlen, calib_dataset=args.calib_dataset,
                     cache_dir=args.cache_dir, output_path=args.output_path, device=args.device,
                     offload_dir=args.offload_dir, save_quantized=args.save_quantized,
                     load_quantized=args.load_quantized, export_format=args.export and args.export[0],
                     export_dir=args.export and args.export[1], multigpu=args.multigpu, max_memory_gib=args.max_memory,
                     resume=not args.no_resume, progress=not args.no_progress, act_dist_plot=args.act_dist_plot,
                     plot_layers=args.plot_layers)
