"""KID (Bińkowski et al. 2018; beyond the paper): the unbiased polynomial-kernel MMD² on feature subsets.

Checked against a direct double loop and a transcription of torchmetrics' ``poly_mmd``, for ≈0 on one
distribution, > 0 on shifted ones, and for unbiasedness at n = 20 where FID is far above 0.
"""
import numpy as np
import pytest
import torch

from fisher import fid
from fisher.io import FisherError


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² estimator written out term by term (slow)."""
    m, d = x.shape
    k = lambda u, v: (sum(u[t] * v[t] for t in range(d)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m ** 2


def _torchmetrics_poly_mmd(f_real: torch.Tensor, f_fake: torch.Tensor) -> float:
    """torchmetrics 1.9 ``image/kid.py`` ``poly_mmd`` (degree 3, gamma 1/d, coef 1), transcribed."""
    kernel = lambda f1, f2: (f1 @ f2.T * (1.0 / f1.shape[1]) + 1.0) ** 3
    k_xx, k_xy, k_yy = kernel(f_real, f_real), kernel(f_real, f_fake), kernel(f_fake, f_fake)
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(dim=-1) - torch.diag(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(dim=-1) - torch.diag(k_yy)).sum()
    value = (kt_xx_sum + kt_yy_sum) / (m * (m - 1))
    return float(value - 2 * k_xy.sum(dim=0).sum() / (m ** 2))


def test_matches_double_loop_and_torchmetrics():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    ref = _reference_mmd2(x, y)
    assert fid.mmd2_unbiased(x, y) == pytest.approx(ref, abs=1e-10, rel=1e-10)
    assert _torchmetrics_poly_mmd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, abs=1e-10)
    # subset_size >= both sizes: every round is the whole set, so all rounds equal the reference
    out = fid.kid(x, y, subsets=7, subset_size=1000, seed=3)
    assert out["subset_size"] == 9 and out["subsets"] == 7
    assert out["mean"] == pytest.approx(ref, abs=1e-10) and out["std"] == pytest.approx(0, abs=1e-12)


def test_subsets_follow_the_seed_and_clip_to_the_smaller_set():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(25, 3))
    one, again, other = fid.kid(a, b, 5, 10, seed=0), fid.kid(a, b, 5, 10, seed=0), fid.kid(a, b, 5, 10, seed=1)
    assert one == again and one["mean"] != other["mean"] and one["subset_size"] == 10
    assert fid.kid(a, b, 2, 1000)["subset_size"] == 25
    # each round is the estimator on some 10-row subsets: reproduce round 1 with the same generator
    g = np.random.default_rng(0)
    ia, ib = g.choice(40, 10, replace=False), g.choice(25, 10, replace=False)
    assert fid.kid(a, b, 1, 10, seed=0)["mean"] == pytest.approx(_reference_mmd2(a[ia], b[ib]), abs=1e-10)
    assert np.isnan(fid.kid(a, b, 1, 10)["stderr"])


def test_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4000, 16)), rng.normal(size=(4000, 16))
    same = fid.kid(a, b, subsets=100, subset_size=50, seed=0)   # small subsets: rounds nearly independent
    assert abs(same["mean"]) < 3 * same["stderr"]
    shifted = fid.kid(a, b + 0.5, subsets=100, subset_size=50, seed=0)
    assert shifted["mean"] > 10 * shifted["stderr"] > 0 and shifted["mean"] > 20 * abs(same["mean"])


def test_unbiased_at_small_n_where_fid_is_not():
    rng = np.random.default_rng(3)
    kids, fids = [], []
    for _ in range(2000):
        a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
        kids.append(fid.kid(a, b, subsets=1, seed=0)["mean"])
        fids.append(fid.fid(fid.stats_from_features(a), fid.stats_from_features(b)))
    kids, fids = np.array(kids), np.array(fids)
    se = lambda v: v.std(ddof=1) / np.sqrt(len(v))
    assert abs(kids.mean()) < 3 * se(kids)
    assert fids.mean() > 50 * se(fids) and fids.mean() > 1.0   # FID's bias at n = 20 (true value 0)


@pytest.mark.parametrize("a, b, kwargs, match", [
    (np.zeros((1, 4)), np.zeros((5, 4)), {}, "at least 2 feature rows"),
    (np.zeros((5, 4)), np.zeros((5,)), {}, "at least 2 feature rows"),
    (np.zeros((5, 4)), np.zeros((5, 3)), {}, "dimensions differ"),
    (np.full((5, 4), np.nan), np.zeros((5, 4)), {}, "NaN"),
    (np.zeros((5, 4)), np.zeros((5, 4)), {"subsets": 0}, "subsets >= 1"),
    (np.zeros((5, 4)), np.zeros((5, 4)), {"subset_size": 1}, "subset_size >= 2"),
])
def test_bad_input(a, b, kwargs, match):
    with pytest.raises(FisherError, match=match):
        fid.kid(a, b, **kwargs)
