"""Base class for a decoder block whose forward we own.

The block wraps the Hugging Face layer (same parameter tensors, no copies) and
routes every declared activation point through ``self.taps[point]``: an identity
for full precision, an observer during calibration, a quantizer afterwards. The
forward is our own, so it does not depend on how a given transformers release
wires its layers: explicit attention where the probabilities are tapped, the
fused kernel where nothing reads them.
"""
from __future__ import annotations

import torch
from torch import nn

from quant.transforms import OnlineTransforms

from .spec import BlockSpec


class QuantBlock(nn.Module):
    def __init__(self, layer: nn.Module, spec: BlockSpec):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.taps = nn.ModuleDict({point: nn.Identity() for point in spec.points})
        # Per point: channel transforms that could not be folded into weights (rotations after a
        # norm, DuQuant's permutation between rotations), applied before the tap.
        self.online = nn.ModuleDict({point: OnlineTransforms() for point in spec.points})
        # Per norm-output point: a channel gather applied to the norm's input (RPTQ R1/R4).
        self.gathers: dict[str, torch.Tensor | None] = {edge.point: None for edge in spec.norm_edges}
        # Per linear: how its weight was quantized (scale/zero per row x group, bits, grid, groups),
        # what a packed checkpoint stores next to the integer codes.
        self.weight_codes: dict[str, dict] = {}
        # Keys this block's queries may attend to: the last ``window`` positions (a sliding-window layer), or all.
        self.window: int | None = None

    # -- helpers the architecture's forward uses -------------------------------------------------
    def tap(self, point: str, x: torch.Tensor) -> torch.Tensor:
        online = self.online[point]
        if len(online):
            x = online(x)
        return self.taps[point](x)

    def norm_out(self, point: str, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Norm output in the (possibly reordered) channel order, through its tap.

        Normalisation statistics are permutation invariant, so gathering the input and
        using the gathered affine parameters equals gathering the output.
        """
        perm = self.gathers[point]
        if perm is not None:
            x = x.index_select(-1, perm.to(x.device))
        return self.tap(point, norm(x))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                  attention_mask: torch.Tensor | None, probs_point: str) -> torch.Tensor:
        """Causal multi-head attention on (B, T, heads*head_dim) tensors; returns (B, T, heads*head_dim)."""
        heads = self.spec.heads
        bsz, seqlen, _ = q.shape
        q = q.view(bsz, seqlen, heads.num_heads, heads.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, heads.num_kv_heads, heads.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, heads.num_kv_heads, heads.head_dim).transpose(1, 2)
        if heads.group > 1:
            k = k.repeat_interleave(heads.group, dim=1)
            v = v.repeat_interleave(heads.group, dim=1)
        windowed = self.window is not None and self.window < seqlen
        if attention_mask is None and not windowed and self._untouched(probs_point):
            # Nothing reads or changes the probabilities (full precision, the calibration's FP pass):
            # the fused kernel, as Hugging Face's own forward uses (no 12 x 512 x 512 score tensors).
            out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
            return out.transpose(1, 2).reshape(bsz, seqlen, heads.num_heads * heads.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        if windowed:  # key j is seen from query i only if i - j < window (transformers' sliding_window_overlay)
            causal = causal & torch.ones_like(causal).triu(1 - self.window)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[..., -seqlen:, -seqlen:]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask.to(scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = self.tap(probs_point, probs)
        out = torch.matmul(probs, v)
        return out.transpose(1, 2).reshape(bsz, seqlen, heads.num_heads * heads.head_dim)

    def _untouched(self, point: str) -> bool:
        """Whether ``point`` passes through unchanged: an identity tap (or a disabled quantizer), no online transform."""
        if len(self.online[point]):
            return False
        tap = self.taps[point]
        return isinstance(tap, nn.Identity) or getattr(getattr(tap, "spec", None), "enabled", True) is False

    def record_kv(self, cache, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this chunk's K/V to the model's cache, refusing incremental decoding.

        The eager attention sees the current tokens only. Were the cache left empty, a
        ``generate`` step would look like a fresh one-token prompt and be silently wrong;
        recording keeps the cache's length truthful so the next step is caught here.
        """
        layer_idx = self.layer.self_attn.layer_idx
        if cache.get_seq_length(layer_idx) > 0:
            raise NotImplementedError("quantized blocks attend over the current tokens only: KV-cache decoding "
                                      "(generate) is not supported; run full sequences")
        heads = self.spec.heads
        bsz, seqlen, _ = k.shape
        shape = (bsz, seqlen, heads.num_kv_heads, heads.head_dim)  # HF cache layout: (B, kv_heads, T, d)
        cache.update(k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), layer_idx)

    def module(self, path: str) -> nn.Module:
        return self.layer.get_submodule(path)

    def on_qk_permuted(self, q_perm: torch.Tensor, k_perm: torch.Tensor) -> None:
        """Query/key rows were permuted within heads; RoPE architectures permute their tables here."""
