"""Gemma 3 (text): the block declaration and its explicit forward.

What differs from Llama, and what the declaration says about it:
- sandwich norms: ``input_layernorm`` and ``pre_feedforward_layernorm`` feed the linears (R1, R4, as Llama's two
  norms), while ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise the attention's and the
  MLP's outputs before they join the residual. A residual rotation (QuaRot's R1) would have to pass those
  post-norms' per-channel gains, which it cannot: ``ResidualSpec.unsupported`` refuses it in one line;
- every RMSNorm multiplies by (1 + w): the owned block replaces the decoder layer's four norms by RMSNorms whose
  gain is 1 + w (the same fp32 arithmetic), so scales and permutations fold into a plain gain;
- per-head ``q_norm``/``k_norm`` before RoPE (``QKEdge.norms``, as Qwen3), GeGLU (``act_fn`` is GELU-tanh; the
  block is SwiGLU's with another activation), one K/V head on the 270M model (GQA);
- local and global layers: a sliding window on the layers ``layer_types`` marks, and two RoPE bases, so each
  layer's rotary tables come from its type (``layer_kwargs``); the attention scale is query_pre_attn_scalar^-1/2;
- the embeddings are scaled by sqrt(hidden) inside the embedding module, before layer 0.
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

from .block import QuantBlock
from .llama import LlamaAdapter, LlamaBlock, llama_block_spec, sliding_window
from .norms import RMSNorm
from .spec import BlockSpec, ResidualSpec

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _offset_gain(norm: nn.Module) -> torch.Tensor:
    """The gain a Gemma RMSNorm multiplies by: 1 + w (ours, once converted, hold it as their weight)."""
    return norm.weight if isinstance(norm, RMSNorm) else 1.0 + norm.weight.float()


def _as_plain_norm(layer: nn.Module, name: str) -> None:
    norm = layer.get_submodule(name)
    if isinstance(norm, RMSNorm):
        return
    plain = RMSNorm(norm.weight.numel(), norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(_offset_gain(norm))
    setattr(layer, name, plain)


class Gemma3Block(LlamaBlock):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs) -> torch.Tensor:
        if position_embeddings is None:
            raise ValueError("Gemma3Block needs position_embeddings=(cos, sin) for its layer type")
        layer = self.layer
        attn, mlp = layer.self_attn, layer.mlp
        cos, sin = position_embeddings

        residual = hidden_states
        h = self.norm_out("qkv_in", layer.input_layernorm, hidden_states)
        q, k, v = self.qkv(h, cos, sin)
        if past_key_values is not None:
            self.record_kv(past_key_values, k, v)
        o = self.attention(q, k, v, attn.scaling, attention_mask, "p")
        hidden_states = residual + layer.post_attention_layernorm(attn.o_proj(self.tap("o_in", o)))

        residual = hidden_states
        h = self.norm_out("gate_up_in", layer.pre_feedforward_layernorm, hidden_states)
        h = self.tap("down_in", mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return residual + layer.post_feedforward_layernorm(mlp.down_proj(h))


class Gemma3Adapter(LlamaAdapter):
    name = "gemma3_text"
    qk_norms = True
    # Gemma is trained with BOS always first and breaks without it: on the first 4 PTB-validation windows of 512
    # the 270M model gives 310 cut from the running text and 126 with each window led by BOS.
    windows_need_bos = True
    # The owned block holds the norms' 1 + w as their gains; Hugging Face's Gemma 3 reads w.
    export_unsupported = ("Gemma 3's norms are held as 1 + w by the owned block, and the export does not write "
                          "them back as Gemma's w yet; evaluate in the same run or use --save_quantized")

    def check(self, config) -> None:
        super().check(config)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UserError("this Gemma 3 configuration soft-caps its attention logits, which the owned block does "
                            "not; a Gemma 3 checkpoint (attn_logit_softcapping null) is needed")
        if getattr(config, "use_bidirectional_attention", False):
            raise UserError("this Gemma 3 configuration attends bidirectionally (an encoder); only causal "
                            "language models are supported")

    def block_spec(self, config) -> BlockSpec:
        return llama_block_spec(config, qk_norms=True, mlp_norm="pre_feedforward_layernorm")

    def residual_spec(self, config) -> ResidualSpec:
        return ResidualSpec(embeddings=("model.embed_tokens",), writers=("self_attn.o_proj", "mlp.down_proj"),
                            final_norm="model.norm", head="lm_head",
                            unsupported="Gemma 3's post-attention and post-feedforward norms scale the writers' "
                                        "outputs channel by channel after they are normalised, which an orthogonal "
                                        "rotation of the residual cannot pass")

    def make_block(self, layer: nn.Module, spec: BlockSpec) -> QuantBlock:
        for name in _NORMS:
            _as_plain_norm(layer, name)
        block = Gemma3Block(layer, spec, qk_gain=_offset_gain)
        block.window = sliding_window(layer.self_attn.config, layer.self_attn.layer_idx)
        return block

    def layer_kwargs(self, model, index: int, kwargs: dict) -> dict:
        """Layer ``index``'s rotary tables from its type's base (local layers 10k, global ones 1M on the 270M
        model); the captured ones are layer 0's."""
        position_ids = kwargs.get("position_ids")
        cos, _ = kwargs["position_embeddings"]
        if position_ids is None:
            position_ids = torch.arange(cos.shape[-2], device=cos.device).unsqueeze(0)
        tables = model.model.rotary_emb(cos, position_ids, model.config.layer_types[index])
        return {**kwargs, "position_embeddings": tables}

    def head_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(model.model.norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap
