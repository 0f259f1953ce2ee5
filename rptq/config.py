"""The quantization settings of a run, as small frozen dataclasses.

``QuantConfig`` holds what every method shares (bits, grid, weight quantizer, seed) plus one
sub-dataclass per method family; ``rptq.methods.PRESETS`` fills them by paper name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models.spec import KEY, LINEAR_IN, LN_OUT, PROBS, QUERY, VALUE, BlockSpec

FP = 16
REORDER_POINTS = ("R1", "R2", "R3", "R4", "R5")
DEFAULT_CLUSTERS = {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32}


@dataclass(frozen=True)
class SmoothSettings:
    """SmoothQuant's migration strength and where it applies ("norm": the norm-fed inputs, as
    SmoothQuant; "all": every linear input, as DuQuant)."""

    alpha: float = 0.5
    points: str = "norm"
    floor: float = 1e-5  # DuQuant floors its smoothing scales at 1e-2 (set by its preset)


@dataclass(frozen=True)
class FPTQSettings:
    """FPTQ's layerwise activation rule: r = max|X| <= v0 static; <= v1 (norm-fed) LAE + static;
    else per-token dynamic. KV: per-token, per-head dynamic at kv_bits (16 = off)."""

    v0: float = 15.0
    v1: float = 150.0
    kv_bits: int = 8


@dataclass(frozen=True)
class RotationSettings:
    """DuQuant's online rotations at the linear inputs (and the plain-rotation baseline)."""

    kind: str = "duquant"  # duquant (greedy R1, zigzag P, R2) | hadamard | random
    block_size: int = 128  # a channel count it does not divide uses the largest power of two that does
    steps: int = 256
    permute: bool = True
    outlier_index: str = "official"  # the released code's row-index rule, or "paper"
    act_clip: float = 0.9
    sample_tokens: int = 2048  # calibration token rows the search sees (DuQuant: one 2048-token sequence)


@dataclass(frozen=True)
class ResidualSettings:
    """QuaRot's rotations: R1 on the residual stream (the residual_rotate step), R2 per head
    (head_rotate), R4 at the MLP's second linear input (mlp_rotate); KV cache clipping."""

    kind: str = "hadamard"  # R1: randomized Hadamard (random orthogonal where none is built) | random
    kv_clip: float = 0.95  # QuaRot's K/V clipping ratio (per token x head, asymmetric)
    across_heads: bool = True  # head_rotate's online mixer across the heads at o_proj's input (QuaRot; not SpinQuant)


@dataclass(frozen=True)
class SpinSettings:
    """SpinQuant's learning of R1 and R2 (the spin_rotate step): Cayley SGD steps, the peak learning
    rate of its cosine schedule, and how many calibration windows it sees (one per step, cycled)."""

    steps: int = 8  # SmolLM2-135M, 512-token windows: ~45 s a step on the 2-core dev box (README)
    lr: float = 1.5
    samples: int = 4


@dataclass(frozen=True)
class GPTQTSettings:
    inter_bits: int = 0  # step-1 bits; 0 = wbits + 1
    variant: str = "B"
    gammas: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rptq"
    transforms: tuple[str, ...] = ("reorder",)
    wbits: int = 4
    abits: int = 4
    only_quant_kv: bool = False
    abits_policy: str = "rptq"  # activation policy: rptq | uniform | smoothquant | fptq | duquant
    reorder: str = "12345"  # which of R1..R5 are clustered; "" = per-tensor baseline
    clusters: dict = field(default_factory=lambda: dict(DEFAULT_CLUSTERS))
    metric: str = "ema_minmax"
    kmeans_features: str = "minmax"  # minmax (reference: global extremes) | metric (the --metric ranges)
    a_dynamic: bool = False
    a_dynamic_method: str = "per_cluster"  # per_cluster: per sequence and cluster (reference) | per_token
    grid: str = "reference"
    w_quantizer: str = "gptq"
    w_range: str = "minmax"  # minmax (reference) | with_zero (GPTQ's convention)
    w_group_size: int = 0  # 0: per row, per input cluster where the input is reordered; N: groups of N
    w_clip: float = 1.0
    w_clip_search: bool = False  # QuaRot's per-row weight range search (quant.clip_search; quarot preset)
    fp16_scales: bool = False  # weight scales on fp16 numbers (packed checkpoints are then exact)
    sf8_scales: bool = False  # weight scales rounded up onto 1-byte sf8 numbers (smallest checkpoints)
    percdamp: float = 0.01
    blocksize: int = 128
    disable_w_quant: bool = False
    disable_a_quant: bool = False
    seed: int = 2
    smooth: SmoothSettings = field(default_factory=SmoothSettings)
    fptq: FPTQSettings = field(default_factory=FPTQSettings)
    rotation: RotationSettings = field(default_factory=RotationSettings)
    gptqt: GPTQTSettings = field(default_factory=GPTQTSettings)
    residual: ResidualSettings = field(default_factory=ResidualSettings)
    spin: SpinSettings = field(default_factory=SpinSettings)

    def reorders(self, point: str) -> bool:
        """Whether reorder point 'R1'..'R5' is clustered."""
        return "reorder" in self.transforms and point[1] in self.reorder

    @property
    def weight_bits(self) -> int:
        return FP if self.disable_w_quant else self.wbits

    @property
    def act_bits(self) -> int:
        return FP if self.disable_a_quant else self.abits


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
