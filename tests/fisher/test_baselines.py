"""Model-free baselines (paper sec. 5): the add-one smoothed independent-pixel NLL and pixel-space
interpolation."""
import numpy as np
import pytest
from conftest import MNIST_NAMES, SHARED_DATA

from fisher import baselines
from fisher.data import binarize, load_mnist_split
from fisher.fid import to_unit_float
from fisher.io import FisherError

REAL_MNIST = SHARED_DATA / "mnist"
has_mnist = all((REAL_MNIST / n).exists() for pair in MNIST_NAMES.values() for n in pair)


def test_smoothing_by_hand():
    # binary, N = 3 train images of 2 pixels: pixel 0 always 0 → p = (4/5, 1/5); pixel 1 has one 0 → (2/5, 3/5)
    train = np.array([[0, 1], [0, 0], [0, 1]], np.uint8)
    out = baselines.independent_pixel_nll(train, np.array([[1, 1], [0, 0]], np.uint8), levels=2)
    expected = (np.log(25 / 3) + np.log(25 / 8)) / 2
    assert out["nll_nats_per_image"] == pytest.approx(expected, rel=1e-12)
    assert out["bits_per_dim"] == pytest.approx(expected / (2 * np.log(2)), rel=1e-12)
    assert (out["n_train"], out["n_test"], out["dims"], out["levels"]) == (3, 2, 2, 2)
    # three levels, one sub-pixel, train values 0, 2, 2: counts (1, 0, 2) → p = (2/6, 1/6, 3/6)
    log_p = baselines.independent_pixel_log_probs(baselines.pixel_counts(np.array([[0], [2], [2]]), 3))
    assert np.allclose(np.exp(log_p), [[2 / 6, 1 / 6, 3 / 6]], atol=1e-15)
    one = baselines.independent_pixel_nll(np.array([[0], [2], [2]]), np.array([[1]]), levels=3)
    assert one["nll_nats_per_image"] == pytest.approx(np.log(6))


def test_train_nll_is_the_smoothed_cross_entropy(monkeypatch):
    rng = np.random.default_rng(0)
    levels, train = 5, rng.integers(0, 5, (37, 3, 4, 2)).astype(np.uint8) * (rng.random((37, 3, 4, 2)) < 0.7)
    monkeypatch.setattr(baselines, "CHUNK", 8)            # counting and scoring in several chunks
    out = baselines.independent_pixel_nll(train, train, levels)
    flat, n = train.reshape(37, -1), 37
    expected = 0.0
    for pixel in flat.T:                                  # -Σ_v (c_v / N) log((c_v + 1) / (N + levels))
        c = np.array([(pixel == v).sum() for v in range(levels)])
        expected -= (c / n * np.log((c + 1) / (n + levels))).sum()
    assert out["nll_nats_per_image"] == pytest.approx(expected, rel=1e-12)
    assert out["dims"] == 24


def test_interpolation_endpoints_exact_and_midpoint():
    rng = np.random.default_rng(1)
    x1, x2 = rng.random((3, 1, 5, 4)).astype(np.float32), rng.random((3, 1, 5, 4)).astype(np.float32)
    out = baselines.pixel_interpolations(x1, x2, [0.0, 0.5, 1.0])
    assert out.shape == (3, 3, 1, 5, 4) and out.dtype == np.float32
    assert (out[:, 0] == x1).all() and (out[:, 2] == x2).all()
    assert np.allclose(out[:, 1], (x1 + x2) / 2, atol=1e-7) and out.min() >= 0 and out.max() <= 1
    assert baselines.pixel_interpolations(x1[0], x2[0], [0.25]).shape == (1, 1, 1, 5, 4)
    # stored integer images (P, H, W, C) with levels: the endpoints are fisher.fid.to_unit_float's images
    u1, u2 = rng.integers(0, 32, (2, 6, 6, 3), dtype=np.uint8), rng.integers(0, 32, (2, 6, 6, 3), dtype=np.uint8)
    stored = baselines.pixel_interpolations(u1, u2, [0, 0.125, 1], levels=32)
    assert stored.shape == (2, 3, 3, 6, 6)
    assert (stored[:, 0] == to_unit_float(u1, 32)).all() and (stored[:, 2] == to_unit_float(u2, 32)).all()


@pytest.mark.parametrize("call, match", [
    (lambda: baselines.independent_pixel_nll(np.zeros((0, 4), np.uint8), np.zeros((2, 4), np.uint8), 2), "non-empty"),
    (lambda: baselines.independent_pixel_nll(np.zeros((3, 4), np.uint8), np.zeros((2, 5), np.uint8), 2), "shape"),
    (lambda: baselines.independent_pixel_nll(np.full((3, 4), 2, np.uint8), np.zeros((2, 4), np.uint8), 2), "levels"),
    (lambda: baselines.independent_pixel_nll(np.zeros((3, 4)), np.zeros((2, 4)), 2), "integer"),
    (lambda: baselines.independent_pixel_nll(np.zeros((3, 4), np.uint8), np.zeros((2, 4), np.uint8), 1), ">= 2"),
    (lambda: baselines.pixel_interpolations(np.zeros((2, 1, 3, 3)), np.zeros((1, 1, 3, 3)), [0.5]), "differ"),
    (lambda: baselines.pixel_interpolations(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3)), [1.5]), "alphas"),
    (lambda: baselines.pixel_interpolations(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3)), []), "alphas"),
    (lambda: baselines.pixel_interpolations(np.full((1, 1, 3, 3), 2.0), np.zeros((1, 1, 3, 3)), [0]), r"\[0, 1\]"),
    (lambda: baselines.pixel_interpolations(np.zeros((1, 3)), np.zeros((1, 3)), [0]), "need images"),
])
def test_bad_input(call, match):
    with pytest.raises(FisherError, match=match):
        call()


@pytest.mark.slow
@pytest.mark.skipif(not has_mnist, reason=f"real MNIST not found at {REAL_MNIST} (set FISHER_SHARED_DATA)")
def test_real_binarized_mnist_independent_pixel_nll():
    grey_train, _ = load_mnist_split(str(REAL_MNIST), "train", limit=20_000)
    grey_test, _ = load_mnist_split(str(REAL_MNIST), "test")
    train = binarize(grey_train, seed=0, split="train")[..., None]
    test = binarize(grey_test, seed=0, split="test")[..., None]
    out = baselines.independent_pixel_nll(train, test, levels=2)
    assert (out["n_train"], out["n_test"], out["dims"]) == (20_000, 10_000, 784)
    assert out["nll_nats_per_image"] == pytest.approx(205.9, abs=1.5)
