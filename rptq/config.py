"""The method's settings and the bit policy that turns them into per-point bit widths."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.spec import KEY, LINEAR_IN, LN_OUT, PROBS, QUERY, VALUE, BlockSpec

FP = 16
REORDER_POINTS = ("R1", "R2", "R3", "R4", "R5")
DEFAULT_CLUSTERS = {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32}


@dataclass(frozen=True)
class QuantConfig:
    wbits: int = 4
    abits: int = 4
    only_quant_kv: bool = False
    abits_policy: str = "rptq"  # "rptq": LN outputs and P at max(8, abits); "uniform": all at abits, P at 16
    reorder: str = "12345"  # which of R1..R5 are clustered; "" = per-tensor baseline
    clusters: dict = field(default_factory=lambda: dict(DEFAULT_CLUSTERS))
    metric: str = "ema_minmax"
    a_dynamic: bool = False
    w_quantizer: str = "gptq"
    percdamp: float = 0.01
    blocksize: int = 128
    disable_w_quant: bool = False
    disable_a_quant: bool = False
    seed: int = 2

    def reorders(self, point: str) -> bool:
        """Whether reorder point 'R1'..'R5' is clustered."""
        return point[1] in self.reorder

    @property
    def weight_bits(self) -> int:
        return FP if self.disable_w_quant else self.wbits


def role_bits(cfg: QuantConfig, role: str) -> int:
    """Bit width of an activation point of the given role (see the README's manifest table)."""
    if cfg.disable_a_quant or cfg.abits >= FP:
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


def point_reorder(spec: BlockSpec) -> dict[str, str]:
    """Activation point -> the reorder point (R1..R5) whose clusters give its groups."""
    owner = {edge.point: edge.reorder for edge in spec.norm_edges}
    owner[spec.qk_edge.q_point] = owner[spec.qk_edge.k_point] = spec.qk_edge.reorder
    for edge in spec.linear_edges:
        owner[edge.point] = edge.reorder
        if edge.value_point:
            owner[edge.value_point] = edge.reorder
    return owner


def bit_manifest(cfg: QuantConfig, spec: BlockSpec) -> dict[str, dict]:
    """Per tensor point: bits, granularity, static or dynamic (stored in results.json)."""
    owner = point_reorder(spec)
    manifest = {}
    for point, role in spec.points.items():
        bits = role_bits(cfg, role)
        reorder = owner.get(point)
        if bits >= FP:
            gran = "none"
        elif reorder and cfg.reorders(reorder):
            per_head = reorder in ("R2", "R3")
            gran = f"cluster({reorder}={cfg.clusters[reorder]}{' per head' if per_head else ''})"
        else:
            gran = "tensor"
        manifest[point] = {"bits": bits, "granularity": gran, "static": bits < FP and not cfg.a_dynamic}
    for linear, point in spec.linear_inputs.items():
        reorder = owner.get(point)
        bits = cfg.weight_bits
        if bits >= FP:
            gran = "none"
        elif reorder and cfg.reorders(reorder):
            gran = f"row x cluster({reorder})"
        else:
            gran = "row"
        manifest[f"weight:{linear}"] = {"bits": bits, "granularity": gran, "static": True}
    return manifest
