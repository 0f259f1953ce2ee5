"""OPT: the block declaration and its explicit forward."""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

from .block import QuantBlock
from .spec import (KEY, LINEAR_IN, LN_OUT, PROBS, QUERY, VALUE, BlockSpec, HeadLayout, LinearEdge,
                   NormEdge, QKEdge, ResidualSpec)


def opt_block_spec(config) -> BlockSpec:
    heads = config.num_attention_heads
    return BlockSpec(
        heads=HeadLayout(num_heads=heads, num_kv_heads=heads, head_dim=config.hidden_size // heads),
        hidden_size=config.hidden_size,
        norm_edges=(
            NormEdge("R1", "self_attn_layer_norm",
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv_in"),
            NormEdge("R4", "final_layer_norm", ("fc1",), "fc1_in"),
        ),
        qk_edge=QKEdge("R2", "self_attn.q_proj", "self_attn.k_proj", "q", "k", q_prescaled=True),
        linear_edges=(
            LinearEdge("R3", ("self_attn.v_proj",), "self_attn.out_proj", "out_in", per_head=True,
                       value_point="v", scalable=("self_attn.v_proj",)),
            LinearEdge("R5", ("fc1",), "fc2", "fc2_in", scalable=("fc1",)),
        ),
        points={"qkv_in": LN_OUT, "q": QUERY, "k": KEY, "v": VALUE, "p": PROBS,
                "out_in": LINEAR_IN, "fc1_in": LN_OUT, "fc2_in": LINEAR_IN},
        linear_inputs={"self_attn.q_proj": "qkv_in", "self_attn.k_proj": "qkv_in",
                       "self_attn.v_proj": "qkv_in", "self_attn.out_proj": "out_in",
                       "fc1": "fc1_in", "fc2": "fc2_in"},
    )


class OPTBlock(QuantBlock):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        layer = self.layer
        attn = layer.self_attn
        residual = hidden_states
        h = self.norm_out("qkv_in", layer.self_attn_layer_norm, hidden_states)
        q = self.tap("q", attn.q_proj(h) * attn.scaling)
        k = self.tap("k", attn.k_proj(h))
        v = self.tap("v", attn.v_proj(h))
        if past_key_values is not None:
            self.record_kv(past_key_values, k, v)
        o = self.attention(q, k, v, 1.0, attention_mask, "p")
        hidden_states = residual + attn.out_proj(self.tap("out_in", o))

        residual = hidden_states
        h = self.norm_out("fc1_in", layer.final_layer_norm, hidden_states)
        h = self.tap("fc2_in", layer.activation_fn(layer.fc1(h)))
        return residual + layer.fc2(h)


class OPTAdapter:
    name = "opt"
    layers_path = "model.decoder.layers"  # where the decoder layers live in the causal LM
    windows_need_bos = False  # perplexity/calibration windows are cut from the running text (GPTQ protocol)

    def check(self, config) -> None:
        if not config.do_layer_norm_before:
            raise UserError("this OPT variant (e.g. opt-350m) applies LayerNorm after attention, so its "
                            "residual stream cannot keep its order under R1/R4 reordering; use another size")

    def block_spec(self, config) -> BlockSpec:
        return opt_block_spec(config)

    def residual_spec(self, config) -> ResidualSpec:
        projected = config.word_embed_proj_dim != config.hidden_size
        return ResidualSpec(embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                            writers=("self_attn.out_proj", "fc2"), final_norm="model.decoder.final_layer_norm",
                            head="lm_head", layer_norm=True,
                            unsupported="its embeddings are projected (word_embed_proj_dim != hidden_size)"
                            if projected else "")

    def layers(self, model) -> nn.ModuleList:
        return model.model.decoder.layers

    def make_block(self, layer: nn.Module, spec: BlockSpec) -> QuantBlock:
        return OPTBlock(layer, spec)

    def layer_kwargs(self, model, index: int, kwargs: dict) -> dict:
        """Decoder layer ``index``'s keyword arguments given layer 0's (the same for every OPT layer)."""
        return kwargs

    def head_logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """What the model does after its last decoder layer."""
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return model.lm_head(hidden)

    def max_positions(self, config) -> int:
        return config.max_position_embeddings
