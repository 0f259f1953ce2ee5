"""The registry of methods: every module of this package that declares ``METHOD`` (rptq.method_api) is one.

From the declarations it answers what the rest of the toolkit asks: the ``--method`` presets and the full
QuantConfig each implies, the transform steps (``--transforms``) and activation policies (``--abits_policy``),
each method's settings class, the weight quantizer's spec, the bit manifest, and the assumptions a run rests
on. Methods compose: flags override a preset, so ``--transforms smooth,reorder`` runs SmoothQuant's scales
before RPTQ's clusters. No method names a model's modules: they read the block declaration.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from quant.quantizer import WeightSpec, fixed_groups

from ..config import FP, QuantConfig, point_reorder
from ..method_api import Method, Policy, Step
from .rptq import reorders  # RPTQ's clusters are the weight groups where --w_group_size is 0


@functools.cache
def modules() -> tuple[Method, ...]:
    """Every method module's declaration, RPTQ first, then by name (discovered once per process)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "METHOD", None), Method):
            found.append(module.METHOD)
    return tuple(sorted(found, key=lambda m: (m.name != "rptq", m.name)))


def _unique(kind: str, pairs) -> dict:
    out = {}
    for name, value, owner in pairs:
        if name in out:
            raise ValueError(f"{kind} {name!r} is declared twice (by {out[name][1]} and {owner})")
        out[name] = (value, owner)
    return {name: value for name, (value, _) in out.items()}


@functools.cache
def presets() -> dict[str, dict]:
    """``--method`` name -> what it implies: shared QuantConfig fields and ``{method name: {field: value}}``."""
    return _unique("preset", ((n, p, m.name) for m in modules() for n, p in m.presets.items()))


def doc_page(preset: str) -> str:
    """The documentation page of the method module declaring ``--method preset`` (docs/methods/<module>.md)."""
    owner = next((m.name for m in modules() if preset in m.presets), preset)
    return f"docs/methods/{owner}.md"


@functools.cache
def steps() -> dict[str, Step]:
    return _unique("step", ((s.name, s, m.name) for m in modules() for s in m.steps))


@functools.cache
def policies() -> dict[str, Policy]:
    return _unique("policy", ((p.name, p, m.name) for m in modules() for p in m.policies))


@functools.cache
def settings_classes() -> dict[str, type]:
    """Method name -> its settings dataclass (the namespace of its settings in results.json and quant.json)."""
    out = {}
    for m in modules():
        if m.settings is not None:
            if m.settings.namespace != m.name:
                raise ValueError(f"{m.name}'s settings declare namespace {m.settings.namespace!r}")
            out[m.name] = m.settings
    return out


@functools.cache
def clip_fits() -> dict:
    """``--w_clip NAME`` -> the fit a method module declares for it (``search`` lives in the quantizer)."""
    return _unique("weight clipping fit", ((n, f, m.name) for m in modules() for n, f in m.clip_fits.items()))


def method_names() -> tuple[str, ...]:
    return tuple(presets())


def step(name: str) -> Step:
    return steps()[name]


def policy(cfg: QuantConfig) -> Policy:
    return policies()[cfg.abits_policy]


def preset_config(name: str, **overrides) -> QuantConfig:
    """The QuantConfig that ``--method name`` gives before any other flag, with ``overrides`` laid over it:
    shared fields by name, a method's settings as ``{method name: {field: value}}``."""
    preset = dict(presets()[name])
    per_method = {ns: {**preset.pop(ns, {}), **overrides.pop(ns, {})} for ns in settings_classes()}
    settings = {ns: cls(**per_method[ns]) for ns, cls in settings_classes().items()}
    return QuantConfig(**{"method": name, **preset, **overrides, "settings": settings})


def describe_activation(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    return policy(cfg).describe(cfg, spec, point, role)


def weight_groups(cfg: QuantConfig, columns: int, point_groups: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Input-channel groups of a weight: fixed groups of --w_group_size, or the input point's
    clusters (RPTQ: one range per output row and input cluster), or one per row."""
    if cfg.w_group_size > 0:
        return fixed_groups(columns, cfg.w_group_size)
    return point_groups


def weight_spec(cfg: QuantConfig, columns: int, point_groups: tuple[int, ...] | None, row_clip=None) -> WeightSpec:
    """``row_clip``: learned per-row (max, min) clipping factors (``--w_clip learned``)."""
    return WeightSpec(bits=cfg.weight_bits, group_sizes=weight_groups(cfg, columns, point_groups), grid=cfg.grid,
                      include_zero=cfg.w_range == "with_zero", clip=cfg.w_clip, fp16_scales=cfg.fp16_scales,
                      sf8_scales=cfg.sf8_scales, clip_search=cfg.w_clip_fit == "search", row_clip=row_clip)


def describe_weight(cfg: QuantConfig, spec, point: str) -> dict:
    bits = cfg.weight_bits
    if bits >= FP:
        gran = "none"
    elif cfg.w_group_size > 0:
        gran = f"row x group({cfg.w_group_size})"
    else:
        reorder = point_reorder(spec).get(point)
        gran = f"row x cluster({reorder})" if reorder and reorders(cfg, reorder) else "row"
    if bits < FP and cfg.w_quantizer == "gptqt":
        gran += " binary-coded"
    if bits < FP and cfg.w_clip_fit == "learned":
        gran += ", learned clip"
    return {"bits": bits, "granularity": gran, "static": True}


def bit_manifest(cfg: QuantConfig, spec) -> dict[str, dict]:
    """Per tensor point: bits, granularity, static or dynamic (stored in results.json)."""
    manifest = {point: describe_activation(cfg, spec, point, role) for point, role in spec.points.items()}
    for linear, point in spec.linear_inputs.items():
        manifest[f"weight:{linear}"] = describe_weight(cfg, spec, point)
    return manifest


def assumptions(cfg: QuantConfig) -> list[str]:
    """What the run's steps, policy, weight quantizer and weight clipping fit assume where their paper or code is
    silent."""
    declared = {k: v for m in modules() for k, v in m.assumptions.items()}
    return [text for name in (*cfg.transforms, cfg.abits_policy, cfg.w_quantizer, cfg.w_clip_fit)
            for text in declared.get(name, ())]
