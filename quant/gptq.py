"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse
Hessian of the layer's inputs.

Scales are fixed before the sweep (passed in), so any grouping of input channels
(RPTQ's clusters) works without GPTQ knowing where it came from.

``act_order``: sweep the columns by decreasing Hessian diagonal (GPTQ's --act-order), the inputs
that carry the most energy first, while the least error has been pushed onto them. Each column keeps
its own group's scale (GPTQ's --static-groups; llm-compressor's actorder "static"), so the result is
the same kind of weight a plain sweep gives, only rounded in another order.
"""
from __future__ import annotations

import torch

from .grid import code_dtype, dequantize, quantize
from .threads import single_thread_on_cpu


def permute_symmetric_(H: torch.Tensor, perm: torch.Tensor, chunk_bytes: int = 16 << 20) -> None:
    """H <- H[perm][:, perm] in place, one slab at a time.

    Permuting the columns of a block of rows (or the rows of a block of columns) touches
    nothing outside the block, so a slab-sized buffer suffices where index_select would
    hold a second n x n copy (256 MiB for OPT-1.3b's fc2 input, 3 GiB for OPT-66B's).
    Pure copies, so one thread gives the same result (here 0.08 s vs 0.2 s for 3072 x 3072, busy)."""
    n = H.shape[0]
    step = max(1, chunk_bytes // (n * H.element_size()))
    with single_thread_on_cpu(H.device):
        for start in range(0, n, step):
            H[start:start + step] = H[start:start + step].index_select(1, perm)
        for start in range(0, n, step):
            H[:, start:start + step] = H[:, start:start + step].index_select(0, perm)


def _reverse_(H: torch.Tensor) -> None:
    """H <- J H J (J: the exchange matrix) in place: a symmetric permutation by the reversed order."""
    permute_symmetric_(H, torch.arange(H.shape[0] - 1, -1, -1, device=H.device))


def _inverse_cholesky_upper_(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), overwriting the symmetric H.

    GPTQ's recipe (Cholesky, inverse, Cholesky again) costs 4n^3/3 flops. The same factor comes from
    one Cholesky and one triangular inverse (2n^3/3): write H = V V^T with V upper (the Cholesky of
    J H J read backwards, J the exchange matrix); then H^-1 = V^-T V^-1, so U = V^-1. A factor with
    a positive diagonal is unique, so this is U itself, not an approximation (3072 x 3072 here:
    0.38 s vs 0.68 s, and closer to a float64 reference: relative error 1.4e-7 vs 2.1e-7).

    On CPU, LAPACK's potrf/trtri work in the matrix's own memory; torch's cholesky/cholesky_inverse
    allocate a second n x n matrix even with out= (measured: +256 MiB peak on an 8192 x 8192
    Hessian). Returns a (transposed) view of H there."""
    if H.device.type != "cpu" or H.dtype != torch.float32:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    _reverse_(H)  # J H J, symmetric: its Fortran-ordered view below equals it
    a = H.numpy().T  # Fortran-ordered view of the same memory
    with threadpool_limits(limits=1):
        a, info = lapack.spotrf(a, lower=1, clean=1, overwrite_a=1)  # J H J = L L^T; upper triangle zeroed
        if info == 0:
            _reverse_(H)  # V = J L J: upper, H = V V^T
            a, info = lapack.strtri(a, lower=0, unitdiag=0, overwrite_c=1)  # U = V^-1, upper
    if info != 0:
        raise torch.linalg.LinAlgError(f"the damped Hessian is not positive definite (LAPACK info {info})")
    if a.ctypes.data != H.data_ptr():
        raise RuntimeError("LAPACK did not factorise in place")
    return H.t()  # U in Fortran order is U^T in H's row-major memory


def _hessian_slab(columns: int) -> int:
    """Rows per slab of the upper-triangular Hessian accumulation: whole (one GEMM) for narrow
    inputs, where slicing saves little; 256 or 512 rows otherwise (measured here: 3072 columns,
    16 x 512 tokens: 1.06 s full, 0.70 s in 512-row slabs; 768 columns: 0.071 vs 0.055 s)."""
    if columns < 512:
        return columns
    return 256 if columns < 2048 else 512


def _mirror_upper_slabs_(H: torch.Tensor, step: int) -> None:
    """Make H exactly symmetric from its upper triangle, slab by slab (pure copies)."""
    n = H.shape[0]
    with single_thread_on_cpu(H.device):
        for start in range(0, n, step):
            end = min(start + step, n)
            H[end:, start:end] = H[start:end, end:].t()
            diagonal = H[start:end, start:end]  # a GEMM's own lower triangle may differ in the last bit
            diagonal.copy_(diagonal.triu() + diagonal.triu(1).t())


class GPTQ:
    """Accumulates one input Hessian; quantizes any number of weights that read that input
    (q/k/v share theirs), factorising it once."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.columns = columns
        self.device = torch.device(device)
        self._hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._slab = _hessian_slab(columns)
        self._mirrored = True  # the strictly lower off-diagonal slabs hold the mirror of the upper ones
        self.nsamples = 0
        self._factor: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def hessian(self) -> torch.Tensor | None:
        """The full symmetric Hessian (None once factorised or freed)."""
        if not self._mirrored and self._hessian is not None:
            _mirror_upper_slabs_(self._hessian, self._slab)
            self._mirrored = True
        return self._hessian

    @hessian.setter
    def hessian(self, value: torch.Tensor | None) -> None:
        self._hessian, self._mirrored = value, True

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate H = 2/N * sum x x^T over every token row of ``inputs`` (..., columns).

        H is symmetric, so only the slabs on and above the diagonal are computed (row slab i
        against columns i onwards; 58% of the products for 3072 columns in 512-row slabs) and the
        rest is mirrored when H is read. Each entry comes out of the same GEMM arithmetic as with
        the full product (same inner dimension and order: slabbing alone left the digest of
        scripts/bench_calibration.py unchanged), so this only saves time."""
        x = inputs.reshape(-1, self.columns).to(self.device, torch.float32)
        n = x.shape[0]
        H, step = self._hessian, self._slab
        # The running mean's rescaling rides on the GEMM (beta, alpha): no scaled copy of x, no
        # separate pass over H (these were 0.2 s per OPT-125m layer here).
        old_share = self.nsamples / (self.nsamples + n)
        self.nsamples += n
        for start in range(0, self.columns, step):
            H[start:start + step, start:].addmm_(x[:, start:start + step].t(), x[:, start:], beta=old_share,
                                                 alpha=2 / self.nsamples)
        self._mirrored = False

    def permute(self, perm: torch.Tensor) -> None:
        """Reorder the input channels (the Hessian of x[perm] is H[perm][:, perm])."""
        permute_symmetric_(self.hessian, perm.to(self.device))

    def _inverse_factor(self, percdamp: float, act_order: bool = False):
        """Upper Cholesky factor of the damped H^-1 (row i: how column i's error spreads), the
        dead-input mask and the sweep's column order (None: as stored), all in sweep order. Computed
        once, in the Hessian's own memory (one n x n matrix per input)."""
        if self._factor is None:
            H, self.hessian = self.hessian, None
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            perm = None
            if act_order:  # stable: equal diagonals keep their order, so the order is reproducible
                perm = torch.argsort(torch.diag(H), descending=True, stable=True)
                permute_symmetric_(H, perm)
                dead = dead[perm]
            H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
            self._factor = (_inverse_cholesky_upper_(H), dead, perm)
        elif (self._factor[2] is not None) != act_order:
            raise ValueError("this Hessian was factorised for the other column order")
        return self._factor

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_sizes: tuple[int, ...] | None = None, blocksize: int = 128,
                 percdamp: float = 0.01, grid: str = "full", column_quantizer=None,
                 act_order: bool = False) -> torch.Tensor:
        """Return the fake-quantized weight.

        ``scale``/``zero``: (rows, groups) for contiguous input-channel groups of ``group_sizes``
        (None: one group), fixed before the sweep; ``grid`` names their integer grid (quant.grid).
        ``column_quantizer(w_col, column, group) -> q_col``, when given, replaces the uniform
        rounding of each column (a non-uniform grid, e.g. GPTQT's binary-coding levels).
        """
        if act_order and column_quantizer is not None:
            raise ValueError("act_order reorders the columns a column_quantizer is indexed by")
        with single_thread_on_cpu(self.device):
            return self._quantize(weight, scale, zero, bits, group_sizes, blocksize, percdamp, grid,
                                  column_quantizer, act_order)[0]

    def quantize_codes(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       group_sizes: tuple[int, ...] | None = None, blocksize: int = 128,
                       percdamp: float = 0.01, grid: str = "full",
                       act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(the fake-quantized weight, the integer codes it was rounded to): :meth:`quantize`'s sweep,
        keeping each column's codes; quant.grid.dequantize of them with the per-column scale/zero is
        the weight bit for bit (before its cast back to ``weight.dtype``)."""
        with single_thread_on_cpu(self.device):
            return self._quantize(weight, scale, zero, bits, group_sizes, blocksize, percdamp, grid,
                                  act_order=act_order)

    def _quantize(self, weight, scale, zero, bits, group_sizes, blocksize, percdamp, grid="full",
                  column_quantizer=None, act_order=False) -> tuple[torch.Tensor, torch.Tensor | None]:
        Hinv, dead, perm = self._inverse_factor(percdamp, act_order)
        W = weight.detach().to(self.device, torch.float32)
        W = W[:, perm.to(W.device)] if perm is not None else W.clone()  # the sweep's order (indexing copies)
        codes = None if column_quantizer is not None else torch.empty(W.shape, dtype=code_dtype(bits, grid),
                                                                      device=W.device)
        W[:, dead] = 0
        # The column loop runs thousands of tiny ops, so it reads prebuilt views (one per column,
        # group, Hinv row and diagonal entry) instead of indexing tensors: same ops on the same
        # values and memory layout (addr_'s vectorised body and scalar tail round differently, so
        # the layout must stay), less dispatch.
        scales = scale.to(W.device).t().contiguous().unbind(0)  # per group: (rows,)
        zeros = zero.to(W.device).t().contiguous().unbind(0)
        sizes = group_sizes if group_sizes is not None else (self.columns,)
        group_of = [g for g, size in enumerate(sizes) for _ in range(size)]
        if perm is not None:  # each column keeps its stored group's scale
            group_of = [group_of[j] for j in perm.tolist()]

        for start in range(0, self.columns, blocksize):
            end = min(start + blocksize, self.columns)
            width = end - start
            W1 = W[:, start:end].clone()
            Hinv1 = Hinv[start:end, start:end].contiguous()
            rows, diag = Hinv1.unbind(0), Hinv1.diagonal().unbind(0)
            columns = W1.unbind(1)  # views: they see every update below
            quantized, errors, block_codes = [], [], []
            for i in range(width):
                g = group_of[start + i]
                w = columns[i]
                if column_quantizer is None:
                    c = quantize(w, scales[g], zeros[g], bits, grid)
                    q = dequantize(c, scales[g], zeros[g])
                    block_codes.append(c)
                else:
                    q = column_quantizer(w, start + i, g)
                err = torch.sub(w, q).div_(diag[i])
                W1.narrow(1, i, width - i).addr_(err, rows[i].narrow(0, i, width - i), alpha=-1)
                quantized.append(q)
                errors.append(err)
            W[:, start:end] = torch.stack(quantized, dim=1)  # finished columns are never read again
            W[:, end:] -= torch.stack(errors, dim=1) @ Hinv[start:end, end:]
            if codes is not None:
                codes[:, start:end] = torch.stack(block_codes, dim=1)  # exact integers: the cast is exact
        if perm is not None:  # back to the stored order
            inverse = torch.argsort(perm).to(W.device)
            W = W[:, inverse]
            codes = None if codes is None else codes[:, inverse]
        return W.to(weight.dtype), codes

    def free(self) -> None:
        self.hessian = None
        self._factor = None
