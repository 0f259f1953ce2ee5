"""DuQuant's rotation/permutation primitives (quant/rotation.py), independent of any model."""
import math

import pytest
import torch

from quant.rotation import (apply_block_rotation, apply_duquant, block_diag_matrix, duquant_base, duquant_matrix,
                            duquant_transform, greedy_rotation, invert_duquant, largest_pow2_block,
                            random_orthogonal, randomised_base, step_rotation, sylvester_hadamard,
                            zigzag_permutation)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: on the busy shared CPU a second thread makes them 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _orth_err(r):
    return (r @ r.T - torch.eye(r.shape[0], dtype=r.dtype)).abs().max().item()


def _range_ratio(x):
    """max_j m_j / mean_j m_j with m_j the per-channel absmax over tokens."""
    m = x.abs().amax(0)
    return (m.max() / m.mean()).item()


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_hadamard_is_orthogonal_with_constant_magnitude(n):
    h = sylvester_hadamard(n)
    assert h.dtype == torch.float64 and _orth_err(h) < 1e-14
    assert torch.allclose(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 3, 12, 80])
def test_hadamard_rejects_sizes_that_are_not_powers_of_two(n):
    with pytest.raises(ValueError):
        sylvester_hadamard(n)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(64, _gen(1))
    assert _orth_err(q) < 1e-13
    assert torch.equal(q, random_orthogonal(64, _gen(1)))
    assert not torch.allclose(q, random_orthogonal(64, _gen(2)))


@pytest.mark.parametrize("n", [2, 3, 16, 128])
def test_duquant_base_is_orthogonal_and_row0_spreads_an_outlier_evenly(n):
    r = duquant_base(n)
    assert _orth_err(r) < 1e-12
    assert _orth_err(r.float()) < 1e-6
    assert torch.allclose(r[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64), atol=1e-14)
    spike = torch.zeros(n, dtype=torch.float64)
    spike[0] = 1500.0
    assert torch.allclose(spike @ r, torch.full((n,), 1500 / math.sqrt(n), dtype=torch.float64))


def test_randomised_base_keeps_the_spreading_entry_and_is_seeded():
    n = 128
    b = randomised_base(n, _gen(3))
    assert _orth_err(b) < 1e-12
    assert math.isclose(b[0, 0].item(), 1 / math.sqrt(n), rel_tol=1e-12)
    assert torch.equal(b, randomised_base(n, _gen(3)))
    assert not torch.allclose(b, randomised_base(n, _gen(4)))


@pytest.mark.parametrize("d", [0, 1, 77, 127])
def test_step_rotation_spreads_channel_d(d):
    n = 128
    rd = step_rotation(randomised_base(n, _gen(5)), d)
    assert _orth_err(rd) < 1e-12
    assert math.isclose(abs(rd[d, d].item()), 1 / math.sqrt(n), rel_tol=1e-12)  # (e_d R_d)_d


def test_greedy_rotation_stays_orthogonal_after_256_steps():
    x = torch.randn(64, 512, generator=_gen(6))
    res = greedy_rotation(x, 128, steps=256, generator=_gen(7))
    assert res.steps_kept > 100 and len(res.scores) == 257  # a long product is actually checked
    assert _orth_err(res.matrix) < 1e-12
    assert _orth_err(res.matrix.float()) < 1e-6
    # A full 256-step product: float64 stays orthogonal; accumulating in fp16 (the released code;
    # emulated as fp32 products rounded to fp16) is ~4e-3 off, and even fp32 misses 1e-6.
    base, gen = randomised_base(128, _gen(8)), _gen(9)
    r64, r32, r16 = torch.eye(128, dtype=torch.float64), torch.eye(128), torch.eye(128).half()
    for d in torch.randint(0, 128, (256,), generator=gen):
        s = step_rotation(base, int(d))
        r64, r32, r16 = r64 @ s, r32 @ s.float(), (r16.float() @ s.half().float()).half()
    assert _orth_err(r64) < 1e-12 and _orth_err(r32.double()) > 1e-6 and _orth_err(r16.double()) > 1e-3


@pytest.mark.parametrize("outlier_index", ["official", "paper"])
@pytest.mark.parametrize("fresh", [False, True])
def test_greedy_keeps_its_best_prefix_and_spreads_a_planted_spike(outlier_index, fresh):
    """A 1500 spike cannot go below 1500/sqrt(128) = 133 (its row's norm is kept). The released
    code's randomised base spreads it unevenly (see randomised_base), so the search ends near
    270-340 on this input (measured over seeds and both outlier_index rules), not at 133."""
    x = torch.randn(64, 512, generator=_gen(10))
    x[17, 300] = 1500.0
    res = greedy_rotation(x, 128, steps=256, outlier_index=outlier_index, generator=_gen(11),
                          fresh_base_each_step=fresh)
    rotated = apply_block_rotation(x, res.matrix)
    assert res.scores[res.steps_kept] == min(res.scores) <= res.scores[0]
    assert math.isclose(res.scores[0], (x.max() - x.min()).item(), rel_tol=1e-6)
    assert math.isclose((rotated.max() - rotated.min()).item(), res.scores[res.steps_kept], rel_tol=1e-4)
    assert 1500 / math.sqrt(128) - 1e-3 < rotated.abs().max() < 400


def test_greedy_returns_identity_when_no_step_helps():
    x = torch.full((8, 256), 3.0)  # range 0: every rotation makes it worse
    res = greedy_rotation(x, 128, steps=16, generator=_gen(12))
    assert res.steps_kept == 0 and torch.equal(res.matrix, torch.eye(128, dtype=torch.float64))
    assert all(s >= res.scores[0] for s in res.scores)


def test_greedy_rejects_bad_arguments():
    x = torch.randn(4, 96)
    with pytest.raises(ValueError):
        greedy_rotation(x, 64, generator=_gen())  # 96 is not a multiple of 64
    with pytest.raises(ValueError):
        greedy_rotation(x, 32, outlier_index="channel", generator=_gen())
    with pytest.raises(ValueError):
        greedy_rotation(x, 32)  # no generator


def test_block_diag_matrix_has_identical_blocks_and_zeros_elsewhere():
    r, k, n = random_orthogonal(8, _gen(13)), 4, 8
    m = block_diag_matrix(r, k)
    assert m.shape == (32, 32)
    for i in range(k):
        for j in range(k):
            blk = m[i * n:(i + 1) * n, j * n:(j + 1) * n]
            assert torch.equal(blk, r) if i == j else not blk.any()


def test_apply_block_rotation_equals_the_block_diagonal_matmul():
    r = random_orthogonal(16, _gen(14))
    x = torch.randn(3, 5, 64, generator=_gen(15), dtype=torch.float64)
    assert torch.allclose(apply_block_rotation(x, r), x @ block_diag_matrix(r, 4), atol=1e-13)
    assert apply_block_rotation(x.float(), r).dtype == torch.float32


def _blocks(perm, n):
    return [sorted(perm[i:i + n].tolist()) for i in range(0, len(perm), n)]


def test_zigzag_spec_examples():
    # channel j has the j-th largest max
    assert _blocks(zigzag_permutation(-torch.arange(12.0), 4), 4) == [[0, 5, 6, 11], [1, 4, 7, 10], [2, 3, 8, 9]]
    assert _blocks(zigzag_permutation(-torch.arange(8.0), 2), 2) == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_zigzag_is_a_balanced_permutation_sorted_inside_blocks():
    c, n = 1024, 128
    m = torch.rand(c, generator=_gen(16))
    perm = zigzag_permutation(m, n)
    assert torch.equal(torch.sort(perm).values, torch.arange(c))
    top = set(torch.topk(m, c // n).indices.tolist())
    assert [len(top & set(b)) for b in _blocks(perm, n)] == [1] * (c // n)
    inside = m[perm].reshape(c // n, n)
    assert (inside[:, :-1] >= inside[:, 1:]).all()


def test_zigzag_breaks_ties_by_channel_index():
    perm = zigzag_permutation(torch.ones(8), 2)
    assert perm.tolist() == [0, 7, 1, 6, 2, 5, 3, 4]


def test_largest_pow2_block():
    assert largest_pow2_block(576) == 64  # SmolLM2 hidden
    assert largest_pow2_block(1536) == 128
    assert largest_pow2_block(4096) == 128
    assert largest_pow2_block(80) == 16
    assert largest_pow2_block(96, preferred=64) == 32


def test_duquant_transform_is_seeded():
    x = torch.randn(32, 512, generator=_gen(17))
    x[:, 5] *= 30
    a = duquant_transform(x, 128, steps=32, generator=_gen(18))
    b = duquant_transform(x, 128, steps=32, generator=_gen(18))
    c = duquant_transform(x, 128, steps=32, generator=_gen(19))
    assert torch.equal(a.r1, b.r1) and torch.equal(a.perm, b.perm) and torch.equal(a.r2, b.r2)
    assert not torch.allclose(a.r1, c.r1)
    r1_only = duquant_transform(x, 128, steps=32, generator=_gen(18), permute=False)
    assert torch.equal(r1_only.r1, a.r1) and r1_only.perm is None and r1_only.r2 is None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_linear_output_is_unchanged_when_weight_gets_the_same_transform(dtype, tol):
    gen = _gen(20)
    x = torch.randn(48, 256, generator=gen, dtype=dtype)
    x[3, 17] = 300.0
    w = torch.randn(96, 256, generator=gen, dtype=dtype)
    bias = torch.randn(96, generator=gen, dtype=dtype)
    t = duquant_transform(x, 64, steps=64, generator=_gen(21))
    ref = x @ w.T + bias
    out = apply_duquant(x, *t) @ apply_duquant(w, *t).T + bias
    assert ((out - ref).abs().max() / (x @ w.T).abs().max()).item() < tol
    full = duquant_matrix(256, *t)
    assert _orth_err(full) < 1e-12
    assert torch.allclose(apply_duquant(x.double(), *t), x.double() @ full, atol=1e-10)
    assert torch.allclose(invert_duquant(apply_duquant(x, *t), *t), x, atol=tol * 300)


def test_synthetic_outliers_drop_sharply():
    """Spec 11.9 without smoothing: 4 normal-outlier channels (x30) and one massive 1500 entry."""
    gen = _gen(22)
    x = torch.randn(512, 1024, generator=gen)
    x[:, torch.randperm(1024, generator=gen)[:4]] *= 30
    x[100, 500] = 1500.0
    t = duquant_transform(x, 128, steps=256, generator=_gen(23))
    y = apply_duquant(x, *t)
    assert _range_ratio(y) * 10 < _range_ratio(x)
    assert y.abs().max() * 5 < x.abs().max()
