"""The method API: what one method module declares (rptq/methods/<name>.py ends with ``METHOD = Method(...)``).

A method declares, once:
- its **settings**: a frozen dataclass whose fields carry :func:`setting` metadata. A field with a ``flag``
  becomes a command-line flag (help, choices, value check); ``needs`` says which step, activation policy or
  weight quantizer reads it, so a flag given without it is refused; every field is recorded in results.json
  and a checkpoint's quant.json under the method's name, and a --load_quantized flag is checked against it;
- its **steps** (:class:`Step`): block steps run on each block after the full-precision pass, with the
  block's calibration inputs and full-precision outputs at hand (``BlockContext.inputs``/``fp_outputs``:
  what a learned method trains on); model steps run once before layer 0 (QuaRot's R1, SpinQuant's learning);
- its **activation policies** (:class:`Policy`): point -> quantizer;
- its **presets** (``--method`` names): the shared settings they imply and their own or other methods' settings;
- the **assumptions** it rests on where the paper or code is silent (results.json lists those of a run).

The registry (rptq.methods) discovers the modules; rptq.flags builds the parser's flags and their checks
from the declarations, rptq.checkpoint_info the checkpoint record, so a new method touches its own file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from quant.quantizer import ActQuantizer


@dataclass(frozen=True)
class Needs:
    """When a setting is read: any of these steps runs, or the activation policy or weight quantizer is one
    of these, or ``custom(cfg)`` holds (``what`` says it in words)."""

    steps: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    w_quantizers: tuple[str, ...] = ()
    custom: Callable[[Any], bool] | None = None
    what: str = ""

    def met(self, cfg) -> bool:
        return (any(s in cfg.transforms for s in self.steps) or cfg.abits_policy in self.policies
                or cfg.w_quantizer in self.w_quantizers or (self.custom is not None and self.custom(cfg)))

    def describe(self) -> str:
        parts = []
        if self.steps:
            parts.append(f"the {' or '.join(self.steps)} step")
        if self.policies:
            parts.append(f"--abits_policy {_one_of(self.policies)}")
        if self.w_quantizers:
            parts.append(f"--w_quantizer {_one_of(self.w_quantizers)}")
        if self.what:
            parts.append(self.what)
        return " or ".join(parts)


def _one_of(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag: ``--name``. ``const``: a switch that sets the field to this value
    (``--no_permute``); ``check(value)`` returns what is wrong with a value (None: fine)."""

    name: str
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    const: Any = None
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None
    needs: Needs | None = None


def setting(default, flag: str | None = None, help: str = "", *, type: Callable | None = None,
            choices: tuple | None = None, const: Any = None, metavar: str | None = None,
            check: Callable[[Any], str | None] | None = None, needs: Needs | None = None):
    """A settings field; with ``flag`` also a command-line flag (its default is the field's, or the preset's)."""
    meta = {} if flag is None else {"flag": Flag(flag, help, type, choices, const, metavar, check, needs)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type_copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def type_copy(value):
    return dict(value) if isinstance(value, dict) else list(value)


def flags_of(settings_cls) -> list[tuple[str, Flag]]:
    """(field name, flag) of every field of a settings class that is a command-line flag, in field order."""
    return [(f.name, f.metadata["flag"]) for f in dataclasses.fields(settings_cls) if "flag" in f.metadata]


# -- value checks (each returns what is wrong, or None) --------------------------------------------------
def in_unit_interval(value) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be non-negative"


def at_least_one(value) -> str | None:
    return None if value >= 1 else "must be at least 1"


def positive(value) -> str | None:
    return None if value > 0 else "must be positive"


@dataclass(frozen=True)
class Step:
    """A transform step, named in ``--transforms``.

    block:    ``fn(ctx: BlockContext)`` on every block after its full-precision pass (plans and places
              transforms; a learned step trains on ``ctx.inputs`` against ``ctx.fp_outputs``).
    model:    ``fn(mctx: ModelContext)`` once, before layer 0's inputs are captured (rotates or learns over
              the whole model); it may hand each block something in ``mctx.per_layer``.
    requires: steps that must run with it (refused otherwise).
    replaces: steps whose model hook this one performs itself (SpinQuant's learning folds R1 itself).
    whole_model: changes the model outside its decoder blocks (embeddings, norms, head) and every layer at once:
              refused out of core (one layer resident) and by --save_quantized (which stores blocks).
    online:   installs transforms that run at inference (the export format has no place for them).
    token_sample: ``fn(cfg, spec) -> {point: rows}``: calibration token rows the FP pass keeps at those points
              for this step (a rotation search, a learned step's initialisation).
    fits_weight_clips: learns the weights' clipping itself (FlatQuant's LWC, jointly with its transforms),
              so ``--w_clip learned`` runs no separate fit after it.
    unquantized_features: ``fn(cfg) -> bool``: whether, as the first step, it reads its channel features
              (``ctx.feature_observers``) from a pass where the policy's fixed quantizers do not act yet (RPTQ's
              reference clusters on the unquantized layer, then calibrates ranges and Hessians with the softmax
              on its grid); None or False: it needs no such pass.
    """

    name: str
    block: Callable | None = None
    model: Callable | None = None
    requires: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    whole_model: bool = False
    online: bool = False
    token_sample: Callable | None = None
    fits_weight_clips: bool = False
    unquantized_features: Callable | None = None


@dataclass(frozen=True)
class Policy:
    """An activation policy (``--abits_policy``): ``activation(ctx, point, role) -> (QuantSpec, metric)`` and
    ``describe(cfg, spec, point, role) -> dict`` (the bit manifest's entry). ``uses_act_clip``: it reads the
    shared ``--act_clip``. ``fixed(cfg, point, role) -> QuantSpec | None``: a quantizer that needs no statistic
    and already acts in the statistics pass (RPTQ's softmax grid, as its reference calibrates)."""

    name: str
    activation: Callable
    describe: Callable
    uses_act_clip: bool = False
    fixed: Callable | None = None

    def fixed_quantizers(self, cfg, spec) -> dict:
        """{point: ActQuantizer} of the quantizers this policy fixes before any statistic."""
        if self.fixed is None:
            return {}
        specs = {p: self.fixed(cfg, p, role) for p, role in spec.points.items()}
        return {p: ActQuantizer(q) for p, q in specs.items() if q is not None}


@dataclass(frozen=True)
class RunFacts:
    """What a method's ``check`` may know of the run beyond the QuantConfig: the calibration windows and the
    flags given on the command line (argparse names)."""

    nsamples: int
    given: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Method:
    """One method module's declarations (see the module docstring). ``name`` is its settings' namespace in
    results.json and quant.json; ``check(settings, cfg, run: RunFacts)`` refuses combinations of its own
    settings with the run (one-line UserError) and may return adjusted settings (None: unchanged).
    ``clip_fits``: ``--w_clip NAME`` -> ``fn(ctx)``, run on each block after the transform steps and before
    its weights are quantized; it leaves per-row (max, min) factors in ``ctx.weight_clips``."""

    name: str
    summary: str
    settings: type | None = None
    steps: tuple[Step, ...] = ()
    policies: tuple[Policy, ...] = ()
    presets: dict[str, dict] = field(default_factory=dict)
    assumptions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    w_quantizers: tuple[str, ...] = ()
    check: Callable | None = None
    clip_fits: dict[str, Callable] = field(default_factory=dict)
