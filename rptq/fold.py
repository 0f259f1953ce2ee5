"""Place a channel transform at an activation point of a block, along its declared edges.

Where the declaration allows, a transform is folded into the point's producer (a norm's
affine parameters and input gather; a producer linear's rows and bias); otherwise it runs
online in the block's tap. Either way every consumer's input columns get the inverse, so
the block computes the same function (up to floating-point summation order). The
observers' statistics are re-expressed with it (rptq.stats), so they stay valid.
"""
from __future__ import annotations

import torch

from models.block import QuantBlock

from quant.transforms import ChannelTransform, Permutation

NORM, ROWS, ONLINE = "norm", "rows", "online"


@torch.no_grad()
def _set_rows(linear, t: ChannelTransform) -> None:
    weight, bias = t.producer(linear.weight.data, None if linear.bias is None else linear.bias.data)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias


@torch.no_grad()
def _fold_norm(block: QuantBlock, point: str, norm_name: str, t: ChannelTransform) -> None:
    norm = block.module(norm_name)
    weight, bias = t.norm(norm.weight.data, None if getattr(norm, "bias", None) is None else norm.bias.data)
    norm.weight.data = weight
    if bias is not None:
        norm.bias.data = bias
    if isinstance(t, Permutation):  # norm statistics are permutation invariant: gather its input
        previous = block.gathers[point]
        perm = t.perm.cpu()
        block.gathers[point] = perm if previous is None else previous[perm]


def _rows_foldable(block: QuantBlock, point: str, t: ChannelTransform, producer_form) -> tuple[str, ...]:
    """Producers ``t`` can be folded into at a linear edge's point (empty: it must run online)."""
    edge = block.spec.linear_edge(point)
    if edge is None or not t.foldable or len(block.online[point]):
        return ()
    if edge.per_head and block.spec.heads.group > 1 and producer_form is None:
        return ()  # grouped K/V heads: only a transform tied across each group reaches v_proj
    if edge.per_head and isinstance(t, Permutation) and not _within_heads(t.perm, block.spec.heads.head_dim):
        return ()  # attention mixes tokens per head: a channel may not change heads
    return edge.producers if isinstance(t, Permutation) else edge.scalable


def _within_heads(perm: torch.Tensor, head_dim: int) -> bool:
    return bool(torch.equal(perm.cpu() // head_dim, torch.arange(perm.numel()) // head_dim))


@torch.no_grad()
def place(block: QuantBlock, point: str, t: ChannelTransform, observers: dict | None = None,
          producer_form: ChannelTransform | None = None) -> str:
    """Express activation ``point`` in the basis of ``t``; returns where it went (norm/rows/online).

    ``producer_form``: for per-head edges with grouped K/V heads, the same transform on the
    producer's (fewer) channels; V's own activation point is re-expressed by it.
    """
    spec = block.spec
    norm_edge = spec.norm_edge(point)
    producers = _rows_foldable(block, point, t, producer_form)
    if norm_edge is not None and t.foldable and not len(block.online[point]):
        _fold_norm(block, point, norm_edge.norm, t)
        where = NORM
    elif producers:
        edge = spec.linear_edge(point)
        form = producer_form or t
        for name in producers:
            _set_rows(block.module(name), form)
        if edge.value_point and observers is not None and edge.value_point in observers:
            observers[edge.value_point].transform(form)
        where = ROWS
    else:
        block.online[point].steps.append(t)
        where = ONLINE
    for name in spec.readers(point):
        linear = block.module(name)
        linear.weight.data = t.consumer(linear.weight.data)
    if observers is not None and point in observers:
        observers[point].transform(t)
    return where


@torch.no_grad()
def place_qk(block: QuantBlock, tq: ChannelTransform, tk: ChannelTransform, observers: dict | None = None) -> str:
    """Query and key re-expressed together so that Q K^T is unchanged: permutations (within
    heads, RoPE pairs kept) fold into both projections' rows; orthogonal maps run online at both."""
    qk = block.spec.qk_edge
    online_already = len(block.online[qk.q_point]) or len(block.online[qk.k_point])
    if isinstance(tq, Permutation) and isinstance(tk, Permutation) and not online_already:
        _set_rows(block.module(qk.q), tq)
        _set_rows(block.module(qk.k), tk)
        block.on_qk_permuted(tq.perm, tk.perm)
        where = ROWS
    elif (not tq.foldable and not tk.foldable) or online_already:  # after RoPE: no table to adjust
        block.online[qk.q_point].steps.append(tq)
        block.online[qk.k_point].steps.append(tk)
        where = ONLINE
    else:
        raise ValueError("query and key transforms must both be permutations or both orthogonal")
    if observers is not None:
        for point, t in ((qk.q_point, tq), (qk.k_point, tk)):
            if point in observers:
                observers[point].transform(t)
    return where


@torch.no_grad()
def place_within_heads(block: QuantBlock, point: str, t: ChannelTransform, observers: dict | None = None) -> str:
    """An orthogonal block of size head_dim at a per-head edge's point (QuaRot's R2), folded into
    the producers' rows (P V acts on tokens, so V B within each head gives O B within each head;
    the same block on every head, so each query head of a GQA group sees its K/V head's block)
    and the consumer's columns. Anything else, or after an online transform, runs online."""
    edge = block.spec.linear_edge(point)
    if (edge is None or not edge.per_head or getattr(t, "block", None) != block.spec.heads.head_dim
            or len(block.online[point]) or (edge.value_point and len(block.online[edge.value_point]))):
        return place(block, point, t, observers)
    for name in edge.producers:
        _set_rows(block.module(name), t)
    consumer = block.module(edge.consumer)
    consumer.weight.data = t.consumer(consumer.weight.data)
    if observers is not None:
        for p in (edge.value_point, point):
            if p in observers:
                observers[p].transform(t)
    return ROWS
