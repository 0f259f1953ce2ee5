"""The command line's parsed flags as a run's settings: the --method preset first, then every flag
given explicitly; contradictions, out-of-range values and flags the run would ignore are refused
with one line (main.py parses, this decides).

Each method's flags, their checks and the refusal of a flag whose step, policy or weight quantizer does
not run come from the method modules' declarations (rptq.method_api); only the shared settings are
listed here.
"""
from __future__ import annotations

import argparse
import dataclasses

from common.errors import UserError

from . import methods
from .config import BLOCK_INPUTS, QuantConfig
from .export_rules import FORMATS as EXPORT_FORMATS
from .method_api import RunFacts, flags_of
from .run_config import RunConfig

PPL_DEFAULT = "wikitext2,ptb,c4"
# Shared flags whose value becomes the QuantConfig field of the same name when given.
SHARED = ("wbits", "abits", "abits_policy", "grid", "w_range", "w_group_size", "act_clip", "gptq_order")


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """Every method's settings flags (rptq.method_api.setting), grouped by method; default None = not given."""
    for method in methods.modules():
        if method.settings is None or not flags_of(method.settings):
            continue
        group = parser.add_argument_group(f"{method.name} ({method.summary.split(' (')[0]})")
        for _, flag in flags_of(method.settings):
            if flag.const is not None:
                group.add_argument(f"--{flag.name}", action="store_const", const=flag.const, default=None,
                                   help=flag.help)
            else:
                group.add_argument(f"--{flag.name}", type=flag.type, choices=flag.choices, default=None,
                                   metavar=flag.metavar, help=flag.help)


def method_flag_values(args) -> dict[str, dict[str, object]]:
    """Method name -> {field: value} of the method flags given; each value checked (one line if bad)."""
    out: dict[str, dict[str, object]] = {}
    for name, cls in methods.settings_classes().items():
        for field, flag in flags_of(cls):
            value = getattr(args, flag.name, None)
            if value is None:
                continue
            problem = flag.check(value) if flag.check else None
            if problem:
                raise UserError(f"--{flag.name} {problem} (got {value})")
            out.setdefault(name, {})[field] = value
    return out


def _w_clip(value: str) -> tuple[float, str]:
    """--w_clip: a ratio in (0, 1], ``search`` (QuaRot's per-row search) or ``learned`` (LWC)."""
    if value in ("search", "learned"):
        return 1.0, value
    try:
        ratio = float(value)
    except ValueError:
        raise UserError(f"--w_clip takes a ratio in (0, 1], search or learned (got {value!r})") from None
    if not 0 < ratio <= 1:
        raise UserError(f"--w_clip must be in (0, 1] (got {ratio})")
    return ratio, ""


def _transforms(text: str) -> tuple[str, ...]:
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in steps if s not in methods.steps()]
    if unknown:
        raise UserError(f"unknown transform step {unknown[0]!r}; steps: {', '.join(methods.steps())}")
    return steps


def quant_config(args) -> QuantConfig:
    """QuantConfig from the method preset, then every flag given explicitly."""
    preset = dict(methods.presets()[args.method])
    per_method = {name: preset.pop(name, {}) for name in methods.settings_classes()}
    base = {**{f.name: getattr(QuantConfig(), f.name) for f in dataclasses.fields(QuantConfig) if f.name != "settings"},
            **preset}
    base.update({flag: getattr(args, flag) for flag in SHARED if getattr(args, flag) is not None})
    if args.w_quantizer is not None:
        base["w_quantizer"] = "rtn" if args.w_quantizer == "normal" else args.w_quantizer
    if args.w_clip is not None:
        base["w_clip"], base["w_clip_fit"] = _w_clip(args.w_clip)
    if args.transforms is not None:
        base["transforms"] = _transforms(args.transforms)
    if args.block_inputs is not None:
        base["block_inputs"] = args.block_inputs
    given = method_flag_values(args)
    for name, values in given.items():
        per_method[name] = {**per_method[name], **values}
    for name, value in (("--w_group_size", base["w_group_size"]),):
        if value < 0:
            raise UserError(f"{name} must be non-negative (got {value})")
    if not 0 < base["act_clip"] <= 1:
        raise UserError(f"--act_clip must be in (0, 1] (got {base['act_clip']})")
    if args.pack_weight and args.scale_format == "exact":
        raise UserError("--pack_weight stores fp16 weight scales; it contradicts --scale_format exact (drop one)")
    scale_format = args.scale_format or ("fp16" if args.pack_weight else "exact")
    base.update(method=args.method, only_quant_kv=args.only_quant_kv, metric=args.metric, a_dynamic=args.a_dynamic,
                a_dynamic_method=args.a_dynamic_method, percdamp=args.percdamp, act_order=args.act_order,
                disable_w_quant=args.disable_w_quant, disable_a_quant=args.disable_a_quant, seed=args.seed,
                fp16_scales=scale_format == "fp16", sf8_scales=scale_format == "sf8")
    settings = {name: cls(**per_method[name]) for name, cls in methods.settings_classes().items()}
    quant = QuantConfig(**base, settings=settings)
    refuse_unused(args, quant)
    facts = RunFacts(nsamples=args.nsamples, given=frozenset(
        flag.name for cls in methods.settings_classes().values() for _, flag in flags_of(cls)
        if getattr(args, flag.name, None) is not None))
    for method in methods.modules():
        if method.check is not None:
            checked = method.check(quant.of(method.settings), quant, facts) if method.settings else \
                method.check(None, quant, facts)
            if checked is not None:
                quant = quant.using(checked)
    return quant


def _runs(quant: QuantConfig) -> str:
    return (f"--method {quant.method} runs transforms {','.join(quant.transforms) or 'none'}, --abits_policy "
            f"{quant.abits_policy}, --w_quantizer {quant.w_quantizer}")


def refuse_unused(args, quant: QuantConfig) -> None:
    """A flag the run would ignore, or a step without the step it needs, is an error (issue #20): every method
    flag's ``needs``, every step's ``requires``, and the shared flags a policy or step has to read."""
    for cls in methods.settings_classes().values():
        for _, flag in flags_of(cls):
            if getattr(args, flag.name, None) is not None and flag.needs is not None and not flag.needs.met(quant):
                raise UserError(f"--{flag.name} is used only with {flag.needs.describe()}; {_runs(quant)} (drop the "
                                "flag or add what it needs)")
    for name in quant.transforms:
        for needed in methods.step(name).requires:
            if needed not in quant.transforms:
                raise UserError(f"the {name} step needs the {needed} step; add {needed} to --transforms")
    if quant.act_order and (quant.w_quantizer != "gptq" or quant.weight_bits >= 16):
        raise UserError(f"--act_order orders GPTQ's columns; {_runs(quant)} without a GPTQ weight sweep (drop the "
                        "flag, or quantize weights with --w_quantizer gptq)")
    clipping = tuple(p.name for p in methods.policies().values() if p.uses_act_clip)
    if args.act_clip is not None and quant.abits_policy not in clipping:
        raise UserError(f"--act_clip is used only with --abits_policy {', '.join(clipping)}; {_runs(quant)} (drop the "
                        "flag or add what it needs)")


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
    if args.max_memory is not None and args.max_memory <= 0:
        raise UserError(f"--max_memory is in GiB and must be positive (got {args.max_memory})")
    if args.pack_weight and not args.save_quantized:
        raise UserError("--pack_weight stores packed weights in a --save_quantized directory; pass --save_quantized DIR")
    if args.export and args.export[0] not in EXPORT_FORMATS:
        raise UserError(f"--export {args.export[0]}: unknown format; one of {', '.join(EXPORT_FORMATS)}")
    quant = quant_config(args)
    whole = [s for s in quant.transforms if methods.step(s).whole_model]
    if args.save_quantized and whole:
        raise UserError(f"--save_quantized cannot yet store a residual-rotated model ({whole[0]} changes the "
                        f"embeddings, norms and head, which a checkpoint does not hold); evaluate in the same run, or "
                        f"drop {whole[0]}")
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
