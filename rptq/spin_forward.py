"""The fake-quantized model as a function of SpinQuant's rotations R1 and R2, for learning them.

The model is the norm-folded one (rptq.residual_rotate.fold_residual) and is only read: every
decoder layer runs through a fresh owned block (models' QuantBlock wrapper around the same layer)
under torch.func.functional_call with weights computed from the original ones and the current
rotations, so gradients reach R1/R2 and no weight of the model changes. Per layer:

- readers W R1, writers R1^T W (bias b R1); v_proj's rows per K/V head R2^T W and o_proj's columns
  per query head W R2 (the head_rotate fold, GQA through the K/V head: the same R2 on every head);
- the fixed online rotations the calibration will install where they change what is quantized
  (R3 on Q/K after RoPE, R4 at the MLP's second linear input, QuaRot's across-heads mixer where
  that setting is on), their transposes in the consumers' columns;
- activations by the method's policy at their taps with straight-through rounding (SpinQuant's
  STEQuantize: the gradient passes as if unquantized; scales carry no gradient); weights likewise RTN
  per output channel on the run's grid when RTN also quantizes them after learning (--w_quantizer rtn),
  and left in full precision when GPTQ does (the released README's W16A4KV4 rule for GPTQ).

The embeddings' output h0 is captured once; the model sees h0 R1 and its head reads h R1^T
(SpinQuant's training forward does the same instead of rotating the embedding and head tables).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.func import functional_call

from quant.quantizer import ActQuantizer, quantize_weight_rtn
from quant.transforms import BlockRotation

from . import methods
from .config import QuantConfig
from .context import BlockContext
from .methods.duquant import qk_matrix
from .methods.quarot import QuaRotSettings, across_heads_matrix, mlp_matrix


class SteTap(nn.Module):
    """An activation quantizer whose rounding passes the gradient straight through."""

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            shift = self.quantizer(x.detach()) - x.detach()
        return x + shift


def _ste_weight(w: torch.Tensor, spec) -> torch.Tensor:
    with torch.no_grad():
        shift = quantize_weight_rtn(w.detach(), spec.group_sizes, spec.bits, spec) - w.detach()
    return w + shift


def rows_per_head(w: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Each head's block of output rows B^T W (a producer's rows: its output is v B per head)."""
    d = r2.shape[0]
    return (r2.T @ w.reshape(-1, d, w.shape[-1])).reshape(w.shape)


def columns_per_head(w: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Each head's block of input columns W B (a consumer of v B per head)."""
    d = r2.shape[0]
    return (w.reshape(w.shape[0], -1, d) @ r2).reshape(w.shape)


class SpinForward:
    """Cross-entropy of the fake-quantized model, differentiable in R1 and the per-layer R2."""

    def __init__(self, model: nn.Module, adapter, cfg: QuantConfig):
        self.model, self.adapter, self.cfg = model, adapter, cfg
        self.spec = adapter.block_spec(model.config)
        rs = adapter.residual_spec(model.config)
        self.readers = {n for edge in self.spec.norm_edges for n in edge.linears}
        self.writers = set(rs.writers)
        self.learn_r2 = "head_rotate" in cfg.transforms
        # The released README: when GPTQ quantizes the weights afterwards, the rotations are learned on a network
        # whose activations alone are quantized (W16A4KV4); RTN weights are learned through (STE) only when RTN
        # is also what quantizes them after learning. Any other weight quantizer here follows the GPTQ rule.
        self.quantize_weights = cfg.weight_bits < 16 and cfg.w_quantizer == "rtn"
        heads = [e for e in self.spec.linear_edges if e.per_head]
        self.r2_rows = {n for e in heads for n in e.producers}
        self.r2_columns = {e.consumer for e in heads}
        self.blocks, self.contexts, self.columns = [], [], []
        for i, layer in enumerate(adapter.layers(model)):
            block = adapter.make_block(getattr(layer, "layer", layer), self.spec)
            ctx = BlockContext(block, {}, cfg, i)
            self.columns.append(self._online(ctx))
            self._taps(ctx)
            self.blocks.append(block)
            self.contexts.append(ctx)

    def _taps(self, ctx: BlockContext) -> None:
        policy = methods.policy(self.cfg)
        for point, role in self.spec.points.items():
            qspec, _ = policy.activation(ctx, point, role)
            if qspec.enabled and qspec.dynamic is not None:
                ctx.block.taps[point] = SteTap(ActQuantizer(qspec))
            elif qspec.enabled:
                raise ValueError(f"learning rotations needs dynamic activation quantizers; {point} is static")

    def _online(self, ctx: BlockContext) -> dict[str, list[BlockRotation]]:
        """The online rotations the calibration's steps will place (same matrices, same seeds);
        returns, per consumer linear, the transforms its input columns take."""
        cfg, spec, block = self.cfg, self.spec, ctx.block
        columns: dict[str, list[BlockRotation]] = {}
        if "qk_rotate" in cfg.transforms:
            r3 = qk_matrix(spec.heads.head_dim)
            for point in (spec.qk_edge.q_point, spec.qk_edge.k_point):
                block.online[point].steps.append(BlockRotation(r3))
        for i, edge in enumerate(spec.linear_edges):
            width = block.module(edge.consumer).in_features
            if edge.per_head and self.learn_r2 and cfg.of(QuaRotSettings).across_heads:
                matrix, _ = across_heads_matrix(ctx, width // spec.heads.head_dim)
            elif not edge.per_head and "mlp_rotate" in cfg.transforms:
                matrix, _ = mlp_matrix(ctx, i, width)
            else:
                continue
            block.online[edge.point].steps.append(BlockRotation(matrix))
            columns.setdefault(edge.consumer, []).append(BlockRotation(matrix))
        return columns

    def layer_weights(self, i: int, r1: torch.Tensor, r2: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The block's parameters (detached: the model gets no gradients) with every linear rotated
        and fake-quantized."""
        block = self.blocks[i]
        params = {name: p.detach() for name, p in block.named_parameters()}
        for name in self.spec.linear_inputs:
            lin = block.module(name)
            w = lin.weight.detach().float()
            b = None if lin.bias is None else lin.bias.detach().float()
            if name in self.readers:
                w = w @ r1
            if name in self.writers:
                w = r1.T @ w
                b = None if b is None else b @ r1
            if r2 is not None and name in self.r2_rows:
                w = rows_per_head(w, r2)
                b = None if b is None else (b.reshape(-1, r2.shape[0]) @ r2).reshape(-1)
            if r2 is not None and name in self.r2_columns:
                w = columns_per_head(w, r2)
            for t in self.columns[i].get(name, ()):
                w = t.consumer(w)
            if self.quantize_weights:
                w = _ste_weight(w, self._weight_spec(w.shape[-1]))
            params[f"layer.{name}.weight"] = w.to(lin.weight.dtype)
            if b is not None:
                params[f"layer.{name}.bias"] = b.to(lin.weight.dtype)
        return params

    def _weight_spec(self, columns: int):
        """The run's weight grid, round to nearest: the clipping search and GPTQ come after learning."""
        spec = methods.weight_spec(self.cfg, columns, None)
        return dataclasses.replace(spec, clip_search=False, fp16_scales=False, sf8_scales=False)

    def loss(self, h0: torch.Tensor, ids: torch.Tensor, layer_kwargs: dict, r1: torch.Tensor,
             r2s: list[torch.Tensor] | None) -> torch.Tensor:
        """Mean next-token cross-entropy of one window: h0 (1, T, d) the embeddings' output, ids (T,)."""
        x = h0 @ r1.to(h0.dtype)
        for i, block in enumerate(self.blocks):
            r2 = None if r2s is None else r2s[i]
            x = functional_call(block, self.layer_weights(i, r1, r2), (x,),
                                self.adapter.layer_kwargs(self.model, i, layer_kwargs))
        logits = self.adapter.head_logits(self.model, x @ r1.T.to(x.dtype))
        return nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:].to(logits.device))
