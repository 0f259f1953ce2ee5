"""What an architecture declares about its decoder block, as data.

Methods (RPTQ's reorder, later smoothing or rotation) read these declarations and
never name a model's modules themselves. Module names are paths relative to the
Hugging Face decoder layer (e.g. ``"self_attn.q_proj"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Roles of activation points; the bit policy is written in terms of roles.
LN_OUT, QUERY, KEY, VALUE, PROBS, LINEAR_IN = "ln_out", "q", "k", "v", "p", "linear_in"


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool = False  # RoPE rotates channel i with channel i + head_dim/2 inside each head

    @property
    def group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class NormEdge:
    """A norm whose output (activation point ``point``) is read by ``linears`` (RPTQ R1/R4)."""

    reorder: str
    norm: str
    linears: tuple[str, ...]
    point: str


@dataclass(frozen=True)
class QKEdge:
    """Query and key projections whose rows must be permuted together within heads (R2)."""

    reorder: str
    q: str
    k: str
    q_point: str
    k_point: str
    # The query tap sees q_proj's output times head_dim^-0.5 (OPT scales q before the scores);
    # RPTQ's reference clusters on q_proj's own output, so features are unscaled first.
    q_prescaled: bool = False
    # (q_norm, k_norm): per-head RMSNorms on q and k before RoPE whose one gain every head shares (Qwen3, Gemma 3).
    # The owned forward applies them with a gain per head, so a permutation within heads (R2) stays exact.
    norms: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinearEdge:
    """``producers``' output channels are ``consumer``'s input channels (activation ``point``).

    ``per_head``: the channels live inside attention heads, so permutations stay within
    a head (v_proj -> out_proj, R3); ``value_point`` is then the V activation whose
    channels follow the producer rows. Otherwise a free permutation (fc1 -> fc2, R5).

    ``scalable``: the producers whose rows (and bias) a positive per-channel scale can be
    folded into, because what lies between them and the consumer is positively homogeneous
    in that producer: ReLU after fc1, the linear ``up`` factor of SwiGLU (not ``gate``), the
    attention's P V for v_proj.
    """

    reorder: str
    producers: tuple[str, ...]
    consumer: str
    point: str
    per_head: bool = False
    value_point: str | None = None
    scalable: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockSpec:
    heads: HeadLayout
    hidden_size: int
    norm_edges: tuple[NormEdge, ...]
    qk_edge: QKEdge
    linear_edges: tuple[LinearEdge, ...]
    points: dict[str, str] = field(default_factory=dict)  # activation point -> role, in forward order
    linear_inputs: dict[str, str] = field(default_factory=dict)  # linear -> point feeding it
    # point -> the reader that stands for a shared input where a statistic reads one weight (DuQuant's released
    # smoothing: the query projection for Q/K/V, the up projection for gate/up); undeclared: the first reader
    lead_readers: dict[str, str] = field(default_factory=dict)

    def linears(self) -> tuple[str, ...]:
        return tuple(self.linear_inputs)

    def readers(self, point: str) -> tuple[str, ...]:
        """The linears whose input is activation ``point`` (in quantization order)."""
        return tuple(name for name, p in self.linear_inputs.items() if p == point)

    def lead_reader(self, point: str) -> str:
        """The reader standing for ``point`` where one weight is read (see ``lead_readers``)."""
        return self.lead_readers.get(point) or self.readers(point)[0]

    def norm_edge(self, point: str) -> NormEdge | None:
        return next((e for e in self.norm_edges if e.point == point), None)

    def linear_edge(self, point: str) -> LinearEdge | None:
        return next((e for e in self.linear_edges if e.point == point), None)


@dataclass(frozen=True)
class ResidualSpec:
    """What rotating the residual stream as a whole needs (QuaRot/SpinQuant R1), as module paths.

    ``embeddings`` and ``head`` are relative to the causal LM; ``writers`` (the linears whose
    output is added to the residual) relative to a decoder layer. The residual's readers are the
    block's ``norm_edges`` (every norm of a pre-norm block reads the residual), plus ``final_norm``
    read by ``head``. ``layer_norm``: the norms subtract the channel mean, so the residual is made
    zero-mean first (then they act as RMSNorm and are replaced by one). ``unsupported``: why this
    particular configuration cannot be rotated (empty if it can).
    """

    embeddings: tuple[str, ...]  # tables whose rows are added to the residual (tokens, learned positions)
    writers: tuple[str, ...]
    final_norm: str
    head: str
    layer_norm: bool = False
    unsupported: str = ""
