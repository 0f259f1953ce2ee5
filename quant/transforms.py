"""Channel transforms: re-express an activation's channel basis, give its consumers the inverse.

Every method of the family is a choice of transforms at activation points of the block
declaration: RPTQ permutes channels, SmoothQuant and FPTQ scale them, DuQuant rotates and
permutes them, FlatQuant learns general invertible ones (a block matrix, a Kronecker product).
With x' = x M for an invertible M, a consumer computing x W^T gets W' = W M^-T, so that
x' W'^T = x W^T (for an orthogonal M, W M). Each transform here knows how to act on

- activations (``apply``, applied online at the point when it cannot be folded),
- a consumer's input columns (``consumer``),
- a producer's output rows and bias (``producer``; permutations and positive scales only),
- a norm's affine parameters (``norm``; permutations and scales; rotations do not pass a norm),
- per-channel ranges (``ranges``; None when the new basis mixes channels),
- a Hessian of the point's inputs (``hessian``: H' = M^T H M),

so statistics measured once in the full-precision pass are re-expressed, not measured again.
Transforms are modules (their tensors are buffers that follow ``.to(device)``).
"""
from __future__ import annotations

import torch
from torch import nn

from .gptq import permute_symmetric_
from .rotation import apply_block_rotation


class ChannelTransform(nn.Module):
    kind = "abstract"
    foldable = True  # can live in a producer (norm or linear rows) instead of running online

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def consumer(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def producer(self, weight: torch.Tensor, bias: torch.Tensor | None):
        raise ValueError(f"a {self.kind} cannot be folded into a producer")

    def norm(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return self.producer(weight, bias)  # a norm's affine parameters act like one output row each

    def ranges(self, cmin: torch.Tensor, cmax: torch.Tensor):
        return None

    def hessian(self, H: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers()}


class Permutation(ChannelTransform):
    """New channel i is old channel perm[i]."""

    kind = "permutation"

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long())

    def apply(self, x):
        return x.index_select(-1, self.perm.to(x.device))

    def consumer(self, weight):
        return weight.index_select(1, self.perm.to(weight.device))

    def producer(self, weight, bias):
        perm = self.perm.to(weight.device)
        return weight.index_select(0, perm), None if bias is None else bias.index_select(0, perm)

    def ranges(self, cmin, cmax):
        return cmin[..., self.perm], cmax[..., self.perm]

    def hessian(self, H):
        permute_symmetric_(H, self.perm.to(H.device))  # in place: no second n x n copy
        return H

    def inverse(self) -> torch.Tensor:
        return torch.argsort(self.perm)


class Scale(ChannelTransform):
    """x' = x / s for a positive per-channel s (SmoothQuant, FPTQ's LAE, DuQuant's smoothing)."""

    kind = "scale"

    def __init__(self, s: torch.Tensor):
        super().__init__()
        if not bool((s > 0).all()):
            raise ValueError("a channel scale must be positive (it has to commute with ReLU and keep ranges' order)")
        self.register_buffer("s", s.float())

    def apply(self, x):
        return (x / self.s.to(x.device)).to(x.dtype)

    def consumer(self, weight):
        return (weight.float() * self.s.to(weight.device)).to(weight.dtype)

    def producer(self, weight, bias):
        s = self.s.to(weight.device)
        rows = (weight.float() / s.unsqueeze(1)).to(weight.dtype)
        return rows, None if bias is None else (bias.float() / s).to(bias.dtype)

    def norm(self, weight, bias):
        s = self.s.to(weight.device)
        return (weight.float() / s).to(weight.dtype), None if bias is None else (bias.float() / s).to(bias.dtype)

    def ranges(self, cmin, cmax):
        return cmin / self.s, cmax / self.s

    def hessian(self, H):
        s = self.s.to(H.device)
        H /= s.unsqueeze(1)
        H /= s.unsqueeze(0)
        return H


class BlockRotation(ChannelTransform):
    """x' = x blockdiag(R, ..., R): the same orthogonal n x n block on every n channels.

    Orthogonal, so a consumer gets W' = W blockdiag(R) (x R R^T W^T = x W^T). It mixes
    channels, so it runs online at its point (it cannot pass a norm or a nonlinearity)."""

    kind = "rotation"
    foldable = False

    def __init__(self, R: torch.Tensor):
        super().__init__()
        self.register_buffer("R", R.float())

    @property
    def block(self) -> int:
        return self.R.shape[0]

    def apply(self, x):
        return apply_block_rotation(x.float(), self.R).to(x.dtype)

    def consumer(self, weight):
        return self.apply(weight)  # rows of W are transformed like tokens

    def producer(self, weight, bias):
        """Output rows B^T W and bias b B. Exact only where nothing between the producer and the
        point mixes channels across blocks (attention's P V within heads); ``foldable`` stays False,
        so only a caller that knows that (rptq.fold.place_within_heads) folds it."""
        rows = self.apply(weight.t()).t().contiguous()
        return rows, None if bias is None else self.apply(bias)

    def hessian(self, H):
        """B^T H B for symmetric H, block-wise: two (n*k, b) x (b, b) products, O(n^2 b).

        The transpose between them is made contiguous: as a strided view, matmul cannot fold it
        into one product and runs a batched one over n tiny (k, b) matrices instead -- 5x the
        whole DuQuant+GPTQ calibration on a busy 2-core CPU (issue #21), and thread-count
        dependent in its last bit (768 channels, block 128: two threads differed from one). The
        contiguous form gives the strided form's one-thread result, on any thread count."""
        H.copy_(self.apply(self.apply(H).t().contiguous()).t())
        return H


class BlockLinear(ChannelTransform):
    """x' = x blockdiag(A, ..., A) for an invertible n x n A (FlatQuant's per-head transforms), given with
    ``A_inv_t`` = A^-T (computed by its maker, exactly where it can: U diag(1/s) V^T for A = U diag(s) V^T).

    A consumer gets W' = W blockdiag(A^-T); a producer whose output reaches the point through something that
    acts on tokens only (attention's P V, per head) folds it as rows A^T W and bias b A (``producer``; not
    ``foldable`` in general, so only rptq.fold.place_within_heads folds it). It runs online otherwise."""

    kind = "block_linear"
    foldable = False

    def __init__(self, A: torch.Tensor, A_inv_t: torch.Tensor):
        super().__init__()
        if A.shape != A_inv_t.shape or A.shape[0] != A.shape[1]:
            raise ValueError(f"a block transform needs two square matrices of one size, got {tuple(A.shape)} and "
                             f"{tuple(A_inv_t.shape)}")
        self.register_buffer("A", A.float())
        self.register_buffer("A_inv_t", A_inv_t.float())

    @property
    def block(self) -> int:
        return self.A.shape[0]

    def apply(self, x):
        return apply_block_rotation(x.float(), self.A).to(x.dtype)

    def consumer(self, weight):
        return apply_block_rotation(weight.float(), self.A_inv_t).to(weight.dtype)

    def producer(self, weight, bias):
        rows = self.apply(weight.t()).t().contiguous()
        return rows, None if bias is None else self.apply(bias)

    def hessian(self, H):
        """M^T H M for symmetric H, block-wise (contiguous between the products, as BlockRotation)."""
        H.copy_(self.apply(self.apply(H).t().contiguous()).t())
        return H


def kronecker_sizes(n: int) -> tuple[int, int]:
    """Factor sizes (a, b), a b = n, as FlatQuant picks them (its get_decompose_dim): the smallest a >= sqrt(n)
    with a^2 - n a perfect square c^2, then (a - c, a + c) -- as square as the width allows."""
    a = int(n ** 0.5)
    a += a * a < n
    while True:
        c = int((a * a - n) ** 0.5)
        if c * c == a * a - n:
            return a - c, a + c
        a += 1


def kronecker_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x (L kron R) without materialising the product: each row of x, read as an (a, b) matrix X, becomes
    L^T X R (a = L's size, b = R's, a b = the channels)."""
    a, b = left.shape[0], right.shape[0]
    if x.shape[-1] != a * b:
        raise ValueError(f"{x.shape[-1]} channels are not {a} x {b}")
    grid = x.reshape(*x.shape[:-1], a, b)
    out = left.t().to(x.device, x.dtype) @ (grid @ right.to(x.device, x.dtype))
    return out.reshape(x.shape)


class Kronecker(ChannelTransform):
    """x' = x (L kron R) for invertible L (a x a) and R (b x b), a b = the channels (FlatQuant's transform at
    a linear input: two small matmuls per token instead of one C x C). Given with the inverse-transposed
    factors (L^-T, R^-T), so a consumer gets W' = W (L^-T kron R^-T) exactly as computed by the maker. It
    mixes channels, so it runs online at its point."""

    kind = "kronecker"
    foldable = False

    def __init__(self, left: torch.Tensor, right: torch.Tensor, left_inv_t: torch.Tensor, right_inv_t: torch.Tensor):
        super().__init__()
        for name, m in (("left", left), ("right", right), ("left_inv_t", left_inv_t), ("right_inv_t", right_inv_t)):
            if m.dim() != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(f"a Kronecker factor must be square, {name} is {tuple(m.shape)}")
            self.register_buffer(name, m.float())
        if left.shape != left_inv_t.shape or right.shape != right_inv_t.shape:
            raise ValueError("each Kronecker factor needs its inverse transpose of the same size")

    @property
    def channels(self) -> int:
        return self.left.shape[0] * self.right.shape[0]

    def apply(self, x):
        return kronecker_apply(x.float(), self.left, self.right).to(x.dtype)

    def consumer(self, weight):
        return kronecker_apply(weight.float(), self.left_inv_t, self.right_inv_t).to(weight.dtype)

    def hessian(self, H):
        """M^T H M for symmetric H: the rows by M, then the columns (contiguous in between)."""
        H.copy_(self.apply(self.apply(H).t().contiguous()).t())
        return H


KINDS = {cls.kind: cls for cls in (Permutation, Scale, BlockRotation, BlockLinear, Kronecker)}


def transform_from_state(kind: str, state: dict[str, torch.Tensor]) -> ChannelTransform:
    """A transform rebuilt from its buffers (``state()``), which are named as its constructor's arguments."""
    return KINDS[kind](**state)


class OnlineTransforms(nn.Module):
    """The transforms applied at an activation point at run time, in order."""

    def __init__(self, transforms=()):
        super().__init__()
        self.steps = nn.ModuleList(transforms)

    def forward(self, x):
        for step in self.steps:
            x = step.apply(x)
        return x

    def __len__(self):
        return len(self.steps)
