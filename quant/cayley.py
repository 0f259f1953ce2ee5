"""One Cayley SGD step on the orthogonal group: descend a loss over orthogonal R and stay orthogonal.

SpinQuant (Liu et al., ICLR 2025, arXiv 2405.16406, sec. 3.2) learns its rotations with Cayley SGD
(Li, Li and Todorovic, ICLR 2020, "Efficient Riemannian optimization on the Stiefel manifold via
the Cayley transform"); SpinQuant's ``SGDG`` with ``stiefel=True`` and no momentum. For orthogonal
R and the Euclidean gradient G = dL/dR:

    A = (R^T G - G^T R) / 2                  skew: R A is G projected onto the tangent space at R
    alpha = min(lr, 1 / ||A||_1)             the step cap of Li et al. / SpinQuant (matrix 1-norm)
    R' = R (I - alpha/2 A) (I + alpha/2 A)^-1

The Cayley factor of a skew matrix is orthogonal, so R' is orthogonal whatever alpha is; to first
order R' = R - alpha/2 (G - R G^T R), a descent direction (<G, R A> = ||A||_F^2 / 2 >= 0).
The released code approximates the inverse with 5 fixed-point iterations and re-orthonormalises
by QR on a random 1 % of steps; here the factor is an exact solve in float64 (no drift, no
randomness). Nothing here knows about models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-8  # the released code's guard on 1 / ||A||_1


@dataclass(frozen=True)
class CayleyStep:
    rotation: torch.Tensor  # R' (float64)
    alpha: float  # the step taken: min(lr, 1 / ||A||_1)
    grad_norm: float  # ||A||_F, the Riemannian gradient's size


def skew_gradient(rotation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A = (R^T G - G^T R) / 2 in float64."""
    r, g = rotation.double(), grad.double()
    return 0.5 * (r.T @ g - g.T @ r)


def cayley_step(rotation: torch.Tensor, grad: torch.Tensor, lr: float) -> CayleyStep:
    """R' = R Cayley(-alpha A): one descent step of Cayley SGD from orthogonal ``rotation``."""
    r = rotation.double()
    a = skew_gradient(r, grad)
    alpha = min(lr, 1.0 / (float(torch.linalg.matrix_norm(a, ord=1)) + _EPS))
    eye = torch.eye(r.shape[0], dtype=torch.float64, device=r.device)
    # (I - alpha/2 A)(I + alpha/2 A)^-1 = ((I + alpha/2 A)^-T (I - alpha/2 A)^T)^T, and (I +- alpha/2 A)^T = I -+ alpha/2 A
    factor = torch.linalg.solve(eye - 0.5 * alpha * a, eye + 0.5 * alpha * a).T
    return CayleyStep(r @ factor, alpha, float(a.norm()))


def orthogonality_error(rotation: torch.Tensor) -> float:
    """max |R^T R - I|: 0 for an orthogonal matrix."""
    r = rotation.double()
    return float((r.T @ r - torch.eye(r.shape[0], dtype=torch.float64, device=r.device)).abs().max())
