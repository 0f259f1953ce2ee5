"""Fuse channel permutations into weights along the block's declared edges.

Each function is exact: the block computes the same function before and after,
up to floating-point summation order.
"""
from __future__ import annotations

import torch
from torch import nn

from models.block import QuantBlock
from models.spec import LinearEdge, NormEdge, QKEdge

from .cluster import Layout


@torch.no_grad()
def permute_out_channels(linear: nn.Linear, perm: torch.Tensor) -> None:
    perm = perm.to(linear.weight.device)
    linear.weight.data = linear.weight.data.index_select(0, perm)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, perm)


@torch.no_grad()
def permute_in_channels(linear: nn.Linear, perm: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data.index_select(1, perm.to(linear.weight.device))


@torch.no_grad()
def gather_norm(norm: nn.Module, perm: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if param is not None:
            param.data = param.data.index_select(0, perm.to(param.device))


def fuse_norm_edge(block: QuantBlock, edge: NormEdge, layout: Layout) -> None:
    """Norm output in cluster order: gather the norm, permute the readers' input columns."""
    gather_norm(block.module(edge.norm), layout.perm)
    previous = block.gathers[edge.point]
    block.gathers[edge.point] = layout.perm if previous is None else previous[layout.perm]
    for name in edge.linears:
        permute_in_channels(block.module(name), layout.perm)


def fuse_qk_edge(block: QuantBlock, edge: QKEdge, q_layout: Layout, k_layout: Layout) -> None:
    """Query and key rows permuted alike within heads: Q K^T is unchanged."""
    permute_out_channels(block.module(edge.q), q_layout.perm)
    permute_out_channels(block.module(edge.k), k_layout.perm)
    block.on_qk_permuted(q_layout.perm, k_layout.perm)


def fuse_linear_edge(block: QuantBlock, edge: LinearEdge, layout: Layout,
                     producer_layout: Layout | None = None) -> None:
    """Producer rows and consumer columns permuted alike.

    For per-head edges with grouped-query attention the producer (V) has fewer
    channels than the consumer's input; ``producer_layout`` is then V's own layout.
    """
    producer_perm = (producer_layout or layout).perm
    for name in edge.producers:
        permute_out_channels(block.module(name), producer_perm)
    permute_in_channels(block.module(edge.consumer), layout.perm)
