"""The quantization settings of a run: ``QuantConfig`` holds what every method shares (bits, grid, weight
quantizer, activation ranges, seed); each method's own settings are its module's dataclass
(rptq.method_api), kept in ``QuantConfig.settings`` under the method's name and read with ``cfg.of(Cls)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from models.spec import KEY, LINEAR_IN, LN_OUT, PROBS, QUERY, VALUE, BlockSpec

FP = 16
# What the next block calibrates on: this block's quantized outputs, its full-precision ones, or the quantized
# ones only where the weights were quantized ("weights": the RPTQ reference, which recomputes a block's outputs
# only after GPTQ and otherwise passes its calibration pass's outputs on).
BLOCK_INPUTS = ("quantized", "fp", "weights")
W_CLIP_FITS = ("", "search", "learned")  # a fixed ratio only | QuaRot's per-row search | learned (LWC)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rptq"
    transforms: tuple[str, ...] = ("reorder",)
    wbits: int = 4
    abits: int = 4
    only_quant_kv: bool = False
    abits_policy: str = "rptq"  # activation policy: one a method module declares (rptq, uniform, duquant, ...)
    metric: str = "ema_minmax"
    a_dynamic: bool = False
    a_dynamic_method: str = "per_cluster"  # per_cluster: per sequence and cluster (reference) | per_token
    act_clip: float = 1.0  # dynamic activation clipping ratio of the policies that read it (DuQuant, QuaRot, ...)
    grid: str = "reference"
    w_quantizer: str = "gptq"
    w_range: str = "minmax"  # minmax (reference) | with_zero (GPTQ's convention)
    w_group_size: int = 0  # 0: per row, per input cluster where the input is reordered; N: groups of N
    w_clip: float = 1.0
    w_clip_fit: str = ""  # "" a fixed ratio | "search": QuaRot's per-row search | "learned": LWC on the block output
    fp16_scales: bool = False  # weight scales on fp16 numbers (packed checkpoints are then exact)
    sf8_scales: bool = False  # weight scales rounded up onto 1-byte sf8 numbers (smallest checkpoints)
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False  # GPTQ sweeps columns by decreasing Hessian diagonal, static groups (--act_order)
    # together: every linear's Hessian from the block's one FP pass (GPTQ's opt.py, RPTQ); sequential: one input's
    # readers after another in block order, each next input's Hessian measured anew through the readers quantized
    # so far (QuaRot, SpinQuant; GPTQ's llama.py --true-sequential)
    gptq_order: str = "together"
    disable_w_quant: bool = False
    disable_a_quant: bool = False
    block_inputs: str = "quantized"  # the next block calibrates on this block's quantized or FP outputs
    seed: int = 2
    settings: dict = field(default_factory=dict)  # method name -> its settings dataclass (rptq.method_api)

    def of(self, settings_cls):
        """The settings of one method (its dataclass defaults where the run holds none)."""
        found = self.settings.get(settings_cls.namespace)
        return settings_cls() if found is None else found

    def using(self, *settings) -> "QuantConfig":
        """A copy with these methods' settings (instances of their dataclasses) in place."""
        return dataclasses.replace(self, settings={**self.settings, **{s.namespace: s for s in settings}})

    @property
    def weight_bits(self) -> int:
        return FP if self.disable_w_quant else self.wbits

    @property
    def act_bits(self) -> int:
        return FP if self.disable_a_quant else self.abits

    def flat(self) -> dict:
        """JSON-ready: the shared fields, and each method's settings under its name."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        for name, settings in sorted(self.settings.items()):
            out[name] = dataclasses.asdict(settings)
        return out


def role_bits(cfg: QuantConfig, role: str) -> int:
    """Bit width of an activation point of the given role under the rptq/uniform policies
    (see the README's manifest table)."""
    if cfg.act_bits >= FP:
        return FP
    if cfg.only_quant_kv:
        return cfg.abits if role in (KEY, VALUE) else FP
    if cfg.abits_policy == "uniform":
        return FP if role == PROBS else cfg.abits
    if role in (LN_OUT, PROBS):
        return max(cfg.abits, 8)
    if role in (QUERY, KEY, VALUE, LINEAR_IN):
        return cfg.abits
    raise ValueError(f"unknown activation role {role!r}")


def linear_and_qkv_bits(cfg: QuantConfig, role: str) -> int:
    """Every linear input and Q/K/V at abits, the softmax output FP (SmoothQuant's and DuQuant's
    policies); with --only_quant_kv just K and V."""
    if cfg.act_bits >= FP:
        return FP
    if cfg.only_quant_kv:
        return cfg.abits if role in (KEY, VALUE) else FP
    return cfg.abits if role in (LN_OUT, LINEAR_IN, QUERY, KEY, VALUE) else FP


def point_reorder(spec: BlockSpec) -> dict[str, str]:
    """Activation point -> the reorder point (R1..R5) whose clusters give its groups."""
    owner = {edge.point: edge.reorder for edge in spec.norm_edges}
    owner[spec.qk_edge.q_point] = owner[spec.qk_edge.k_point] = spec.qk_edge.reorder
    for edge in spec.linear_edges:
        owner[edge.point] = edge.reorder
        if edge.value_point:
            owner[edge.value_point] = edge.reorder
    return owner
