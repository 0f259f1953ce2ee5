"""Quantizer primitives and GPTQ, independent of any model."""
import pytest
import torch

from quant.gptq import GPTQ
from quant.quantizer import (ActQuantizer, QuantSpec, affine_params, fake_quant, quantize_weight_rtn,
                             weight_group_params, weight_params)


def test_fake_quant_hits_grid_and_clamps():
    scale, zero = affine_params(torch.tensor(-1.0), torch.tensor(2.0), bits=2)  # 4 levels over [-1, 2]
    assert torch.isclose(scale, torch.tensor(1.0)) and zero.item() == 1.0
    x = torch.tensor([-5.0, -1.0, -0.4, 0.6, 2.0, 9.0])
    assert fake_quant(x, scale, zero, 2).tolist() == [-1.0, -1.0, 0.0, 1.0, 2.0, 2.0]


def _label_groups_reference(x, labels, bits, cmin, cmax):
    """Quantize each label group with its own range, channels left where they are."""
    out = torch.empty_like(x)
    for lab in labels.unique():
        cols = labels == lab
        scale, zero = affine_params(cmin[cols].min(), cmax[cols].max(), bits)
        out[..., cols] = fake_quant(x[..., cols], scale, zero, bits)
    return out


def test_cluster_quantization_after_permutation_equals_label_groups():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 24, generator=gen) * torch.linspace(0.1, 20, 24)
    labels = torch.randint(0, 5, (24,), generator=gen)
    cmin, cmax = x.amin((0, 1)), x.amax((0, 1))
    perm = torch.sort(labels, stable=True).indices  # clusters contiguous
    sizes = tuple(int((labels == lab).sum()) for lab in labels.unique())
    quant = ActQuantizer(QuantSpec(bits=4, group_sizes=sizes), cmin[perm], cmax[perm])
    permuted = quant(x[..., perm])
    restored = torch.empty_like(permuted)
    restored[..., perm] = permuted
    assert torch.allclose(restored, _label_groups_reference(x, labels, 4, cmin, cmax), atol=1e-6)


def test_one_cluster_equals_per_tensor():
    x = torch.randn(2, 8, 16) * torch.linspace(1, 10, 16)
    cmin, cmax = x.amin((0, 1)), x.amax((0, 1))
    one = ActQuantizer(QuantSpec(bits=4, group_sizes=(16,)), cmin, cmax)(x)
    tensor = ActQuantizer(QuantSpec(bits=4, group_sizes=None), cmin, cmax)(x)
    assert torch.equal(one, tensor)


def test_dynamic_per_token_ranges_adapt():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]]])
    out = ActQuantizer(QuantSpec(bits=2, group_sizes=None, dynamic="token"))(x)
    assert torch.allclose(out, x)  # 4 evenly spaced values per token fit 2 bits exactly


def test_weight_ranges_include_zero_and_group_per_row():
    w = torch.tensor([[1.0, 2.0, -4.0, -8.0]])
    scale, zero = weight_params(w, (2, 2), bits=4)
    assert torch.allclose(scale[0], torch.tensor([2 / 15, 2 / 15, 8 / 15, 8 / 15]))
    assert quantize_weight_rtn(torch.zeros(2, 4), None, 4).abs().sum() == 0


def test_gptq_beats_rtn_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=gen)
    x = torch.randn(2048, 32, generator=gen) @ mix  # strongly correlated input channels
    w = torch.randn(16, 32, generator=gen)
    gptq = GPTQ(32)
    for chunk in x.split(256):
        gptq.add_batch(chunk)
    scale, zero = weight_params(w, None, 3)
    q_gptq = gptq.quantize(w, *weight_group_params(w, None, 3), 3, blocksize=8)
    q_rtn = fake_quant(w, scale, zero, 3)
    err = lambda q: ((x @ (q - w).t()) ** 2).mean().item()  # noqa: E731
    assert not torch.equal(q_gptq, w) and not torch.equal(q_rtn, w)
    assert err(q_gptq) < 0.7 * err(q_rtn)
    # every GPTQ weight lies on its row's static grid
    assert torch.allclose(fake_quant(q_gptq, scale, zero, 3), q_gptq, atol=1e-5)


def test_gptq_hessian_permutes_with_inputs():
    x = torch.randn(100, 6)
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    a, b = GPTQ(6), GPTQ(6)
    a.add_batch(x)
    a.permute(perm)
    b.add_batch(x[:, perm])
    assert torch.allclose(a.hessian, b.hessian, atol=1e-5)


def test_hessian_permutation_and_factorisation_work_in_place():
    from quant.gptq import _inverse_cholesky_upper_, permute_symmetric_

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 300, generator=gen)
    H = x.t() @ x / 600
    H.diagonal().add_(0.01)
    perm = torch.randperm(300, generator=gen)
    permuted = H.clone()
    permute_symmetric_(permuted, perm, chunk_bytes=300 * 4 * 7)  # slabs of 7 rows/columns
    assert torch.equal(permuted, H[perm][:, perm])

    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    work = H.clone()
    U = _inverse_cholesky_upper_(work)
    assert U.data_ptr() == work.data_ptr()  # no second n x n matrix
    assert torch.equal(U, torch.triu(U))
    assert torch.allclose(U, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        _inverse_cholesky_upper_(-torch.eye(4))


def test_hessian_from_upper_slabs_equals_the_full_product():
    from quant.gptq import _reverse_

    gen = torch.Generator().manual_seed(4)
    columns = 600  # > 512: accumulated in 256-row slabs, the lower ones mirrored when read
    x = torch.randn(3, 128, columns, generator=gen) * torch.rand(columns, generator=gen) * 3
    gptq = GPTQ(columns)
    gptq.add_batch(x[0])
    first = gptq.hessian.clone()  # read between batches: the mirror is redone after the next one
    gptq.add_batch(x[1:])
    flat = x.reshape(-1, columns)
    full = flat.t() @ flat * (2 / flat.shape[0])
    assert torch.equal(gptq.hessian, gptq.hessian.t())
    assert torch.allclose(gptq.hessian, full, rtol=1e-5, atol=1e-4)
    assert torch.allclose(first, x[0].t() @ x[0] * (2 / 128), rtol=1e-5, atol=1e-4)

    odd = torch.randn(7, 7, generator=gen)  # J H J in place, middle element left alone
    flipped = odd.clone()
    _reverse_(flipped)
    assert torch.equal(flipped, odd.flip(0, 1))
