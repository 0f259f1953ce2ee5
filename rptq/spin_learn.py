"""SpinQuant's learned rotations (the spin_rotate step): learn R1 and each layer's R2 by Cayley SGD
on the fake-quantized model's cross-entropy, then fold them as QuaRot folds its Hadamards.

Liu et al., ICLR 2025 (arXiv 2405.16406), and the released optimize_rotation.py: R1 and R2 start
from random Hadamards, SGDG(stiefel=True) at learning rate 1.5 with a cosine schedule, 100 steps of
8 x 2048-token WikiText-2 windows (800 samples); activations and K/V quantized as at evaluation;
weights RTN with straight-through rounding, except when GPTQ quantizes them afterwards: then the
weights stay in full precision while learning (the released README, "Note"). Here: one calibration
window per step, cycling over the first --spin_samples windows, --spin_steps steps (defaults sized
for a 2-core CPU; see the README). R1 starts from residual_rotate's seeded randomized Hadamard, R2
from a seeded randomized Hadamard of head_dim per layer, so the same seed learns the same rotations.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from models.execution import capture_block_inputs
from quant.cayley import cayley_step, orthogonality_error
from quant.hadamard import orthogonal_mixer

from .config import QuantConfig
from .methods.quarot import QuaRotSettings
from .residual_rotate import fold_residual, initial_rotation, rotate_folded
from .spin_forward import SpinForward


@dataclass(frozen=True)
class LearnedRotations:
    r1: torch.Tensor  # (hidden, hidden) float64
    r2: tuple[torch.Tensor, ...] | None  # per layer (head_dim, head_dim) float64; None without head_rotate
    report: dict  # results.json calibration.spin_rotation


@contextmanager
def _frozen(model: nn.Module):
    """No gradient is accumulated into the model's own parameters while the rotations learn."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def cosine_lr(peak: float, step: int, steps: int) -> float:
    """Hugging Face's cosine schedule without warm-up (SpinQuant's --lr_scheduler_type cosine)."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def _mean_loss(fwd: SpinForward, h0, windows, kwargs, r1, r2s) -> float:
    with torch.no_grad():
        r2 = None if r2s is None else [r.float() for r in r2s]
        return sum(float(fwd.loss(h0[j:j + 1], windows[j], kwargs, r1.float(), r2)) for j in range(len(windows))) \
            / len(windows)


def learn_rotations(model: nn.Module, adapter, windows: torch.Tensor, cfg: QuantConfig, spin,
                    device: torch.device | str = "cpu") -> LearnedRotations:
    """R1 and the per-layer R2 for the norm-folded ``model`` (:func:`fold_residual`), which is only read.
    ``spin``: rptq.methods.spinquant's settings (steps, lr, samples)."""
    start = time.perf_counter()
    samples = windows[:spin.samples]
    fwd = SpinForward(model, adapter, cfg)
    h0, kwargs = capture_block_inputs(model, adapter.layers(model), samples, torch.device(device))
    h0 = h0.float()
    r1, r1_kind = initial_rotation(fwd.spec.hidden_size, cfg.of(QuaRotSettings).kind, cfg.seed)
    r2s, r2_kind = None, None
    if fwd.learn_r2:  # SpinQuant's random_hadamard_matrix(head_dim) per layer; salt 20 as QuaRot's R2
        inits = [orthogonal_mixer(fwd.spec.heads.head_dim, ctx.generator(salt=20)) for ctx in fwd.contexts]
        r2s, r2_kind = [m for m, _ in inits], inits[0][1]
    r1, r2s = r1.to(h0.device), None if r2s is None else [r.to(h0.device) for r in r2s]
    losses, alphas = [], []
    with _frozen(model):
        before = _mean_loss(fwd, h0, samples, kwargs, r1, r2s)
        for step in range(spin.steps):
            lr = cosine_lr(spin.lr, step, spin.steps)
            j = step % len(samples)
            p1 = r1.float().requires_grad_()
            p2 = None if r2s is None else [r.float().requires_grad_() for r in r2s]
            loss = fwd.loss(h0[j:j + 1], samples[j], kwargs, p1, p2)
            loss.backward()
            taken = cayley_step(r1, p1.grad, lr)
            r1 = taken.rotation
            if r2s is not None:
                r2s = [cayley_step(r, p.grad, lr).rotation for r, p in zip(r2s, p2)]
            losses.append(float(loss.detach()))
            alphas.append(taken.alpha)
        after = _mean_loss(fwd, h0, samples, kwargs, r1, r2s) if spin.steps else before
    report = {"steps": spin.steps, "lr": spin.lr, "schedule": "cosine", "samples": len(samples),
              "tokens_per_step": int(samples.shape[1]),
              "weights_while_learning": (f"rtn {cfg.weight_bits}-bit (STE)" if fwd.quantize_weights
                                         else "full precision"),
              "loss_before": before, "loss_after": after,
              "step_losses": losses, "r1_step_sizes": alphas, "r1_init": r1_kind, "r2_init": r2_kind,
              "r1_orthogonality_error": orthogonality_error(r1),
              "r2_orthogonality_error": max((orthogonality_error(r) for r in r2s), default=0.0) if r2s else None,
              "seconds": time.perf_counter() - start}
    return LearnedRotations(r1.cpu(), None if r2s is None else tuple(r.cpu() for r in r2s), report)


@torch.no_grad()
def rotate_model(model: nn.Module, adapter, windows: torch.Tensor, cfg: QuantConfig, spin,
                 device: torch.device | str = "cpu",
                 learned: LearnedRotations | None = None) -> tuple[dict, LearnedRotations]:
    """Fold the norms, learn R1/R2 (unless ``learned`` is given), rotate the residual stream by R1;
    returns (results.json ``residual_rotation``, the rotations; R2 goes to head_rotate per layer)."""
    done = fold_residual(model, adapter)
    if learned is None:
        with torch.enable_grad():
            learned = learn_rotations(model, adapter, windows, cfg, spin, device)
    rotate_folded(model, adapter, learned.r1)
    return {"kind": f"learned (SpinQuant) from {learned.report.get('r1_init', 'given')}", **done}, learned
