"""Llama family: the block declaration and its explicit forward.

Differences from OPT that matter to reordering:
- RMSNorm (no bias): its statistic is a mean of squares over channels, so gathering its
  input and its weight equals gathering its output (``QuantBlock.norm_out`` applies).
- Grouped-query attention: ``num_heads // num_kv_heads`` query heads read one K/V head;
  the rptq planner gives those query heads the K/V head's within-head order.
- RoPE rotates channel pair (i, i + d/2) of every head by angle ``pos * theta_i``. A
  pair-preserving permutation keeps each pair a pair but moves it to another slot, so
  the rotary tables must be gathered by the same within-head permutation (per head,
  because different K/V groups get different orders). ``on_qk_permuted`` stores those
  gathers; the forward applies RoPE itself with them.
- SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``. The product is elementwise, so
  gate and up rows permuted alike permute its channels; down_proj's columns follow (R5).

The family: Mistral (a sliding window on every layer), Qwen2 (q/k/v biases; sliding windows on the layers
its config names), Qwen3 (RMSNorms on each head of q and k before RoPE, ``QKEdge.norms``: applied here with a
gain per head, which R2's within-head permutations gather like the rotary tables). A layer whose window is
shorter than the sequence attends to the last ``window`` positions only (``QuantBlock.window``).
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

from .block import QuantBlock
from .spec import (KEY, LINEAR_IN, LN_OUT, PROBS, QUERY, VALUE, BlockSpec, HeadLayout, LinearEdge,
                   NormEdge, QKEdge, ResidualSpec)

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def llama_head_layout(config) -> HeadLayout:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # Some checkpoints set head_dim explicitly (it need not equal hidden / heads).
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope=True)


def llama_block_spec(config, qk_norms: bool = False, mlp_norm: str = "post_attention_layernorm") -> BlockSpec:
    """``qk_norms``: per-head RMSNorms on q and k (Qwen3, Gemma 3); ``mlp_norm``: the norm feeding the MLP."""
    return BlockSpec(
        heads=llama_head_layout(config),
        hidden_size=config.hidden_size,
        norm_edges=(
            NormEdge("R1", "input_layernorm", _QKV, "qkv_in"),
            NormEdge("R4", mlp_norm, _GATE_UP, "gate_up_in"),
        ),
        qk_edge=QKEdge("R2", "self_attn.q_proj", "self_attn.k_proj", "q", "k",
                       norms=("self_attn.q_norm", "self_attn.k_norm") if qk_norms else ()),
        linear_edges=(
            LinearEdge("R3", ("self_attn.v_proj",), "self_attn.o_proj", "o_in", per_head=True,
                       value_point="v", scalable=("self_attn.v_proj",)),
            LinearEdge("R5", _GATE_UP, "mlp.down_proj", "down_in", scalable=("mlp.up_proj",)),
        ),
        points={"qkv_in": LN_OUT, "q": QUERY, "k": KEY, "v": VALUE, "p": PROBS,
                "o_in": LINEAR_IN, "gate_up_in": LN_OUT, "down_in": LINEAR_IN},
        linear_inputs={**{name: "qkv_in" for name in _QKV}, "self_attn.o_proj": "o_in",
                       **{name: "gate_up_in" for name in _GATE_UP}, "mlp.down_proj": "down_in"},
        lead_readers={"gate_up_in": "mlp.up_proj"},
    )


def sliding_window(config, layer_idx: int) -> int | None:
    """The layer's attention window: its config's ``sliding_window`` on the layers ``layer_types`` marks as sliding
    (Qwen2, Qwen3, Gemma 3), on every layer where there are no layer types (Mistral); None: the whole sequence."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or not types:
        return window
    return window if types[layer_idx] == "sliding_attention" else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the 90-degree turn of every (i, i + d/2) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def local_head_perms(perm: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(heads, head_dim) within-head permutations from a global one; rejects any that would
    move a channel across heads or split a RoPE pair (neither can be made exact)."""
    offsets = torch.arange(num_heads, device=perm.device).unsqueeze(1) * head_dim
    local = perm.reshape(num_heads, head_dim) - offsets
    if local.min() < 0 or local.max() >= head_dim:
        raise ValueError("query/key permutation moves channels across heads")
    half = head_dim // 2
    if not torch.equal(local[:, half:], local[:, :half] + half):
        raise ValueError("query/key permutation splits RoPE pairs (i, i + head_dim/2)")
    return local


class LlamaBlock(QuantBlock):
    def __init__(self, layer: nn.Module, spec: BlockSpec, qk_gain=None):
        """``qk_gain(norm) -> gain``: the effective gain of a q/k norm module (its weight; Gemma's 1 + weight)."""
        super().__init__(layer, spec)
        # Per head, which rotary-table column each (permuted) query/key channel uses; None is
        # the identity. Buffers so that .to(device) moves them with the block.
        self.register_buffer("q_rope_index", None, persistent=False)
        self.register_buffer("k_rope_index", None, persistent=False)
        # Per-head gains of the q/k norms (heads, head_dim), gathered with the rows by R2's permutations.
        self.register_buffer("q_gain", None, persistent=False)
        self.register_buffer("k_gain", None, persistent=False)
        self.qk_eps = 0.0
        if spec.qk_edge.norms:
            heads, (q_norm, k_norm) = spec.heads, (layer.get_submodule(n) for n in spec.qk_edge.norms)
            gain = qk_gain or (lambda norm: norm.weight)
            self.q_gain = gain(q_norm).detach().float().expand(heads.num_heads, -1).clone()
            self.k_gain = gain(k_norm).detach().float().expand(heads.num_kv_heads, -1).clone()
            self.qk_eps = float(q_norm.variance_epsilon if hasattr(q_norm, "variance_epsilon") else q_norm.eps)

    def on_qk_permuted(self, q_perm: torch.Tensor, k_perm: torch.Tensor) -> None:
        heads = self.spec.heads
        q_local = local_head_perms(q_perm.cpu(), heads.num_heads, heads.head_dim)
        k_local = local_head_perms(k_perm.cpu(), heads.num_kv_heads, heads.head_dim)
        # Compose with an earlier permutation: new channel j is old channel local[j], which
        # used table column old_index[local[j]].
        if self.q_gain is not None:  # the norms' gains follow their channels (new channel j is old local[j])
            self.q_gain = self.q_gain.gather(1, q_local.to(self.q_gain.device))
            self.k_gain = self.k_gain.gather(1, k_local.to(self.k_gain.device))
        if self.q_rope_index is not None:
            q_local = self.q_rope_index.cpu().gather(1, q_local)
            k_local = self.k_rope_index.cpu().gather(1, k_local)
        device = self.layer.self_attn.q_proj.weight.device
        self.q_rope_index, self.k_rope_index = q_local.to(device), k_local.to(device)

    def head_norm(self, x: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        """The per-head RMSNorm of q or k (B, T, heads*head_dim) with a gain per head; identity without norms.
        As transformers' RMSNorms: statistics in fp32, the gain applied in fp32, the result in x's dtype."""
        if gain is None:
            return x
        bsz, seqlen, _ = x.shape
        h = x.view(bsz, seqlen, gain.shape[0], -1).float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.qk_eps)
        return (h * gain.to(h.device)).to(x.dtype).reshape(bsz, seqlen, -1)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
             index: torch.Tensor | None) -> torch.Tensor:
        """RoPE on (B, T, heads*head_dim) with (B, T, head_dim) tables, per-head gathered."""
        bsz, seqlen, _ = x.shape
        x = x.view(bsz, seqlen, num_heads, -1)
        if index is None:
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # one table for every head
        else:
            index = index.to(cos.device)
            cos, sin = cos[..., index], sin[..., index]  # (B, T, heads, head_dim)
        out = x * cos + rotate_half(x) * sin
        return out.reshape(bsz, seqlen, -1)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Q and K after their norms (if any) and RoPE, tapped after RoPE: those are the values multiplied (and
        quantized); the 1/sqrt(head_dim) scale is applied to the scores, so Q's tap sees unscaled q. V tapped."""
        attn, heads = self.layer.self_attn, self.spec.heads
        q = self.head_norm(attn.q_proj(h), self.q_gain)
        k = self.head_norm(attn.k_proj(h), self.k_gain)
        q = self.tap("q", self.rope(q, cos, sin, heads.num_heads, self.q_rope_index))
        k = self.tap("k", self.rope(k, cos, sin, heads.num_kv_heads, self.k_rope_index))
        return q, k, self.tap("v", attn.v_proj(h))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs) -> torch.Tensor:
        # Same call signature as transformers 5's LlamaDecoderLayer, which returns a tensor.
        if position_embeddings is None:
            raise ValueError("LlamaBlock needs position_embeddings=(cos, sin) from the model's rotary_emb")
        layer = self.layer
        attn, mlp = layer.self_attn, layer.mlp
        cos, sin = position_embeddings

        residual = hidden_states
        h = self.norm_out("qkv_in", layer.input_layernorm, hidden_states)
        q, k, v = self.qkv(h, cos, sin)
        if past_key_values is not None:
            self.record_kv(past_key_values, k, v)
        o = self.attention(q, k, v, attn.scaling, attention_mask, "p")
        hidden_states = residual + attn.o_proj(self.tap("o_in", o))

        residual = hidden_states
        h = self.norm_out("gate_up_in", layer.post_attention_layernorm, hidden_states)
        h = self.tap("down_in", mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return residual + mlp.down_proj(h)


class LlamaAdapter:
    """Llama and the families that share its block (Mistral, Qwen2; Qwen3 with q/k norms)."""

    name = "llama"
    layers_path = "model.layers"  # where the decoder layers live in the causal LM
    qk_norms = False  # per-head RMSNorms on q and k (Qwen3)
    windows_need_bos = False  # perplexity/calibration windows are cut from the running text (GPTQ protocol)

    def check(self, config) -> None:
        heads = llama_head_layout(config)
        if heads.head_dim % 2:
            raise UserError(f"RoPE needs an even head_dim, got {heads.head_dim}")
        if heads.num_heads % heads.num_kv_heads:
            raise UserError(f"{heads.num_heads} query heads cannot share {heads.num_kv_heads} key/value heads")
        # Partial rotary (only some channels rotated) would need its own pair rule.
        rope = getattr(config, "rope_parameters", None)
        factor = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
        if factor != 1.0:
            raise UserError(f"partial rotary embeddings (factor {factor}) are not supported")

    def block_spec(self, config) -> BlockSpec:
        return llama_block_spec(config, qk_norms=self.qk_norms)

    def residual_spec(self, config) -> ResidualSpec:
        return ResidualSpec(embeddings=("model.embed_tokens",), writers=("self_attn.o_proj", "mlp.down_proj"),
                            final_norm="model.norm", head="lm_head")

    def layers(self, model) -> nn.ModuleList:
        return model.model.layers

    def make_block(self, layer: nn.Module, spec: BlockSpec) -> QuantBlock:
        block = LlamaBlock(layer, spec)
        block.window = sliding_window(layer.self_attn.config, layer.self_attn.layer_idx)
        return block

    def layer_kwargs(self, model, index: int, kwargs: dict) -> dict:
        """The keyword arguments of decoder layer ``index`` given those captured at layer 0 (the same here)."""
        return kwargs

    def head_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """What the model does after its last decoder layer."""
        return model.lm_head(model.model.norm(hidden))

    def max_positions(self, config) -> int:
        return config.max_position_embeddings


class MistralAdapter(LlamaAdapter):
    name = "mistral"


class Qwen2Adapter(LlamaAdapter):
    name = "qwen2"


class Qwen3Adapter(LlamaAdapter):
    name = "qwen3"
    qk_norms = True
