"""Rotate a model's whole residual stream by one orthogonal Q (QuaRot/SpinQuant R1), in place.

Computational invariance (QuaRot, arXiv 2404.00456, sec. 4; SliceGPT): with an RMSNorm whose
gain is folded into its readers, RMSNorm(x Q) = RMSNorm(x) Q, so the residual can be expressed in
any orthonormal basis. Steps, all from the architecture's ResidualSpec and block declaration:

1. fold every norm's gain (and a LayerNorm's shift, as a bias) into the linears that read it;
   the final norm into the head, which is untied from the embeddings first when they share a tensor;
2. LayerNorm models (OPT): make the residual zero-mean (subtract the channel mean from every
   embedding row, learned positions included, and from every writer's output rows and bias).
   LayerNorm of a zero-mean vector is RMSNorm with the same epsilon, so each LayerNorm becomes an
   RMSNorm (models.norms) and the function is unchanged;
3. embeddings E Q, readers' columns W Q, writers' rows Q^T W and biases b Q, head W Q.

Every product is computed in float64 and cast back. Q: randomized Hadamard D H where a Hadamard of
the width is built (quant.hadamard), else a random orthogonal matrix; the report says which.
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError
from models.block import QuantBlock
from models.norms import RMSNorm
from quant.hadamard import orthogonal_mixer
from quant.rotation import random_orthogonal


def _layer_root(layer: nn.Module) -> nn.Module:
    return layer.layer if isinstance(layer, QuantBlock) else layer


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype)


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Readers absorb the norm's gain (columns) and shift (bias W beta); the norm is left with gain 1."""
    gain = norm.weight.data.double()
    shift = getattr(norm, "bias", None)
    for lin in readers:
        w = lin.weight.data.double()
        if shift is not None:
            extra = w @ shift.data.double().to(w.device)
            if lin.bias is None:
                lin.bias = nn.Parameter(extra.to(lin.weight.dtype))
            else:
                _set(lin.bias, lin.bias.data.double() + extra)
        _set(lin.weight, w * gain.to(w.device))
    norm.weight.data.fill_(1.0)
    if shift is not None:
        shift.data.zero_()


def _as_rms(parent: nn.Module, name: str, norm: nn.Module) -> None:
    """Replace a (gain-folded) LayerNorm reading a zero-mean residual by the RMSNorm it now equals."""
    w = norm.weight
    setattr(parent, name, RMSNorm(w.numel(), norm.eps, device=w.device, dtype=w.dtype))


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return (root.get_submodule(head) if head else root), leaf


def _untie_head(model: nn.Module, head: nn.Linear, embeddings: list[nn.Module]) -> bool:
    if not any(head.weight is e.weight for e in embeddings):
        return False
    head.weight = nn.Parameter(head.weight.data.clone())
    model.config.tie_word_embeddings = False  # a later tie_weights() must not undo it
    return True


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter, kind: str, seed: int) -> dict:
    """Fold, centre (LayerNorm models) and rotate the residual stream of ``model`` in place by the
    seeded Q of ``kind`` (hadamard | random); returns what was done (results.json
    ``calibration.residual_rotation``)."""
    done = fold_residual(model, adapter)
    q, kind = initial_rotation(adapter.block_spec(model.config).hidden_size, kind, seed)
    rotate_folded(model, adapter, q)
    return {"kind": kind, **done}


@torch.no_grad()
def fold_residual(model: nn.Module, adapter) -> dict:
    """Steps 1-2: every norm's gain (and shift) into its readers, the head untied, the residual of a
    LayerNorm model made zero-mean; afterwards any orthogonal Q can be applied (:func:`rotate_folded`)."""
    if not hasattr(adapter, "residual_spec"):
        raise UserError(f"the {adapter.name} adapter does not declare its residual stream; drop residual_rotate")
    rs = adapter.residual_spec(model.config)
    if rs.unsupported:
        raise UserError(f"residual_rotate cannot rotate this model: {rs.unsupported}; drop residual_rotate")
    block_spec = adapter.block_spec(model.config)
    layers = [_layer_root(layer) for layer in adapter.layers(model)]
    embeddings = [model.get_submodule(p) for p in rs.embeddings]
    head = model.get_submodule(rs.head)
    untied = _untie_head(model, head, embeddings)
    head_had_bias = head.bias is not None

    for layer in layers:
        for edge in block_spec.norm_edges:
            _fold_norm(layer.get_submodule(edge.norm), [layer.get_submodule(n) for n in edge.linears])
    _fold_norm(model.get_submodule(rs.final_norm), [head])

    if rs.layer_norm:  # SliceGPT: a zero-mean residual, then each LayerNorm is an RMSNorm
        for e in embeddings:
            w = e.weight.data.double()
            _set(e.weight, w - w.mean(1, keepdim=True))
        for layer in layers:
            for path in rs.writers:
                _centre_rows(layer.get_submodule(path))
            for edge in block_spec.norm_edges:
                _as_rms(*_parent(layer, edge.norm), layer.get_submodule(edge.norm))
        _as_rms(*_parent(model, rs.final_norm), model.get_submodule(rs.final_norm))
    return {"size": block_spec.hidden_size, "centred": rs.layer_norm, "head_untied": untied,
            "head_bias_added": head.bias is not None and not head_had_bias}


def initial_rotation(d: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """QuaRot's R1 (float64) and its kind: one Q per run, from the seed (SpinQuant starts from it)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 104_729)
    if kind == "random":
        return random_orthogonal(d, gen), "random"
    return orthogonal_mixer(d, gen)  # randomized Hadamard; a width with no construction: random (reported)


@torch.no_grad()
def rotate_folded(model: nn.Module, adapter, q: torch.Tensor) -> None:
    """Step 3 on a :func:`fold_residual`-ed model: embeddings E Q, readers' columns W Q, writers'
    rows Q^T W and biases b Q, head W Q (float64 products, cast back)."""
    rs = adapter.residual_spec(model.config)
    block_spec = adapter.block_spec(model.config)
    layers = [_layer_root(layer) for layer in adapter.layers(model)]
    embeddings = [model.get_submodule(p) for p in rs.embeddings]
    head = model.get_submodule(rs.head)
    q = q.double()
    for e in embeddings:
        _set(e.weight, e.weight.data.double() @ q.to(e.weight.device))
    readers = [head] + [layer.get_submodule(n) for layer in layers for edge in block_spec.norm_edges
                        for n in edge.linears]
    for lin in readers:
        _set(lin.weight, lin.weight.data.double() @ q.to(lin.weight.device))
    for layer in layers:
        for path in rs.writers:
            lin = layer.get_submodule(path)
            qd = q.to(lin.weight.device)
            _set(lin.weight, qd.T @ lin.weight.data.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.data.double() @ qd)


@torch.no_grad()
def _centre_rows(lin: nn.Linear) -> None:
    """Output rows (and bias) minus their mean over output channels: the writer adds a zero-mean vector."""
    w = lin.weight.data.double()
    _set(lin.weight, w - w.mean(0, keepdim=True))
    if lin.bias is not None:
        b = lin.bias.data.double()
        _set(lin.bias, b - b.mean())
