"""Paper eq. 1 (Li et al. 2006): values, density, sign balance, norms, determinism."""
import math

import numpy as np
import pytest
import torch

from fisher.io import FisherError
from fisher.projection import BLOCK, ProjectionStack, SparseProjection


def test_entries_follow_eq1():
    n, p, d = 20_000, 256, 0.01
    P = SparseProjection(n, p, density=d, seed=3).dense().numpy()
    nz = P[P != 0]
    scale = math.sqrt(1 / d) / math.sqrt(p)
    assert np.allclose(np.abs(nz), scale, rtol=1e-6)                # values are ±√s/√p
    total = n * p
    # empirical density within 5 standard deviations of d
    assert abs(nz.size / total - d) < 5 * math.sqrt(d * (1 - d) / total)
    pos = (nz > 0).sum()
    assert abs(pos / nz.size - 0.5) < 5 * 0.5 / math.sqrt(nz.size)  # sign balance
    # each column's count is Binomial(p, d): mean and variance match
    counts = (P != 0).sum(0)
    assert abs(counts.mean() - p * d) < 0.05 * p * d
    assert abs(counts.var() / (p * d * (1 - d)) - 1) < 0.1


def test_density_one_is_dense_signs():
    P = SparseProjection(2000, 64, 1.0, seed=0).dense().numpy()
    assert np.all(np.abs(P) == np.float32(1 / 8))
    assert abs((P > 0).mean() - 0.5) < 0.01


def test_default_density_is_inverse_sqrt_n():
    P = SparseProjection(10_000, 64)
    assert P.density == pytest.approx(1 / 100)


def test_norm_preservation_jl():
    torch.manual_seed(0)
    n, p = 50_000, 4096
    P = SparseProjection(n, p, seed=1)                 # density 1/sqrt(n)
    g = torch.randn(64, n)
    ratio = P.project(g).norm(dim=1) ** 2 / g.norm(dim=1) ** 2
    assert abs(float(ratio.mean()) - 1) < 0.02
    assert float(ratio.std()) < 4 * math.sqrt(2 / p) + 0.01


def test_pure_function_of_seed_n_dim_density():
    a = SparseProjection(3 * BLOCK // 2, 32, 0.01, seed=7)
    b = SparseProjection(3 * BLOCK // 2, 32, 0.01, seed=7)
    c = SparseProjection(3 * BLOCK // 2, 32, 0.01, seed=8)
    assert np.array_equal(a._rows, b._rows) and np.array_equal(a._signs, b._signs)
    assert not np.array_equal(a._rows[:1000], c._rows[:1000])
    d1, d2 = SparseProjection(3 * BLOCK // 2, 8, 1.0, seed=7), SparseProjection(3 * BLOCK // 2, 8, 1.0, seed=7)
    assert torch.equal(d1.dense(), d2.dense())


def test_blockwise_projection_equals_full_and_dense():
    torch.manual_seed(0)
    n = 5000
    P = SparseProjection(n, 50, 0.2, seed=0)
    g = torch.randn(7, n, dtype=torch.float64).float()
    full = P.project(g)
    parts = P.project(g[:, :1234]) + P.project(g[:, 1234:], offset=1234)
    dense = g @ P.dense().t()
    assert torch.allclose(full, parts, atol=1e-5)
    assert torch.allclose(full, dense, atol=1e-5)


def test_stack_matches_members():
    torch.manual_seed(0)
    n = 3000
    members = [SparseProjection(n, d, dens, seed=0) for d in (8, 16) for dens in (0.01, 1.0)]
    stack = ProjectionStack(members)
    g = torch.randn(9, n)
    for zs, m in zip(stack.project(g), members):
        assert torch.allclose(zs, m.project(g), atol=1e-5)
        assert torch.allclose(zs, g @ m.dense().t(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    with pytest.raises(FisherError, match="density"):
        SparseProjection(100, 10, density)


def test_bad_dim():
    with pytest.raises(FisherError, match="dim"):
        SparseProjection(100, 0)


@pytest.mark.parametrize("n", [3000, 20000])           # one column block, and several
def test_dense_product_does_not_depend_on_the_thread_count(n):
    """Density 1 (dense signs): the same bits with 1, 2 or 3 threads, so embeddings do not depend on how
    many actors share a node (a multi-threaded GEMM may split its long inner dimension across threads)."""
    import torch
    before = torch.get_num_threads()
    p = SparseProjection(n, 64, 1.0, seed=3)
    stack = ProjectionStack([p])
    g = torch.randn(32, n, generator=torch.Generator().manual_seed(0))
    out = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out.append(stack.project(g)[0])
            assert torch.get_num_threads() == threads        # restored after the product
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.allclose(out[0], g @ p.dense().t(), rtol=1e-4, atol=1e-3)
