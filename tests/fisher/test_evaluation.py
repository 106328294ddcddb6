"""Interpolation FID as tasks (paper Algorithm 1), decoding of interpolations and edits.

The FID tables and plots (and the paper's numbers) are tested in tests/fisher/test_reports.py.

A stand-in "Inception" (average pooling to 4x4, 48 features) keeps these fast; the real network is
exercised by tests/raycluster/test_evaluate.py.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fisher import evaluation as ev
from fisher.decoders import build_decoder
from fisher.fid import fid, stats_from_features
from fisher.io import FisherError
from fisher.manipulation import random_pairs

ALPHAS = [0.0, 0.25, 0.5]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    decoder = build_decoder("conv", 8, (28, 28, 1), 2).eval()
    z = torch.randn(12, 8)
    pairs = random_pairs(len(z), 6, seed=3)
    feats = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())           # (B, 3, H, W) → 48
    real = stats_from_features(np.random.default_rng(0).random((40, 48)))
    return decoder, z, pairs, feats, real


def test_alpha_zero_decodes_z1_exactly(setup):
    decoder, z, pairs, *_ = setup
    mix0 = ev.mixtures(z, pairs, np.arange(len(pairs)), 0.0)
    mix1 = ev.mixtures(z, pairs, np.arange(len(pairs)), np.ones(len(pairs)))
    assert torch.equal(mix0, z[pairs[:, 0]]) and torch.equal(mix1, z[pairs[:, 1]])
    x1 = ev.decode_batches(decoder, z[pairs[:, 0]], levels=2)
    assert torch.equal(ev.decode_interpolations(decoder, z, pairs, [0.0], levels=2)[:, 0], x1)
    scorer = ev.InterpolationFeatures(decoder, setup[3], z, pairs, ALPHAS, levels=2)
    assert torch.equal(scorer.images(np.arange(len(pairs))), x1)              # tasks 0..N-1 are α = 0
    assert x1.shape == (6, 1, 28, 28) and x1.min() >= 0 and x1.max() <= 1


def test_pairs_identical_across_alphas(setup):
    decoder, z, pairs, feats, _ = setup
    n = len(pairs)
    pair_idx, alpha_idx = ev.split_tasks(np.arange(n * len(ALPHAS)), n, ALPHAS)
    for a in range(len(ALPHAS)):
        assert np.array_equal(pair_idx[alpha_idx == a], np.arange(n))
    scorer = ev.InterpolationFeatures(decoder, feats, z, pairs, ALPHAS, levels=2)
    for a, alpha in enumerate(ALPHAS):
        expect = torch.lerp(z[pairs[:, 0]], z[pairs[:, 1]], torch.full((n, 1), alpha))
        got = ev.mixtures(z, pairs, pair_idx[alpha_idx == a], alpha)
        assert torch.equal(got, expect)
        torch.testing.assert_close(scorer.images(a * n + np.arange(n)),
                                   ev.decode_batches(decoder, expect, 2), rtol=0, atol=1e-6)
    strip = ev.decode_interpolations(decoder, z, pairs, ALPHAS, levels=2)
    assert strip.shape == (n, len(ALPHAS), 1, 28, 28)
    with pytest.raises(FisherError, match="task ids"):
        ev.split_tasks([n * len(ALPHAS)], n, ALPHAS)


def test_fid_from_features_is_fisher_fid():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(50, 16)) + 0.3
    real = stats_from_features(b)
    assert ev.fid_from_features(a, real) == fid(stats_from_features(a), real)
    assert ev.fid_from_features(a.astype(np.float32), real) == fid(stats_from_features(a.astype(np.float32)), real)


def test_accumulator_independent_of_batching_and_matches_one_process(setup):
    decoder, z, pairs, feats, real = setup
    n = len(pairs)
    scorer = ev.InterpolationFeatures(decoder, feats, z, pairs, ALPHAS, levels=2)
    per_alpha = {alpha: scorer(a * n + np.arange(n)) for a, alpha in enumerate(ALPHAS)}
    expect = {alpha: fid(stats_from_features(f.astype(np.float64)), real) for alpha, f in per_alpha.items()}

    acc = ev.FIDAccumulator(n, ALPHAS, real)
    tasks = np.random.default_rng(0).permutation(n * len(ALPHAS))
    done = []
    for chunk in np.array_split(tasks, 5):                       # any order, any batch sizes
        pair_idx, alpha_idx = ev.split_tasks(chunk, n, ALPHAS)
        rows = np.concatenate([per_alpha[ALPHAS[a]][[i]] for i, a in zip(pair_idx, alpha_idx)])
        done += acc.add(chunk, rows)
        acc.add(chunk[:1], rows[:1])                             # a retried row counts once
    assert sorted(done) == sorted(ALPHAS)
    assert acc.result() == expect

    one = ev.interpolation_fid(decoder, feats, z, real, levels=2, n_pairs=n, alphas=ALPHAS, seed=3, batch_size=4)
    assert list(one) == ALPHAS
    for alpha in ALPHAS:
        assert one[alpha] == pytest.approx(expect[alpha], rel=1e-5)

    partial = ev.FIDAccumulator(n, ALPHAS, real)
    partial.add(np.arange(n), per_alpha[0.0])
    with pytest.raises(FisherError, match="incomplete"):
        partial.result()
    assert acc.kid == {} and acc.kid_result() == {}                # statistics without real features: no KID


def test_accumulator_kid_is_fisher_kid_on_the_same_features(setup):
    """Each α's KID, computed when the α completes (batches in any order), is fisher.fid.kid of that α's
    features in task order against the real rows, with the documented protocol (100 × min(1000, N))."""
    from fisher.fid import kid
    decoder, z, pairs, feats, _ = setup
    n = len(pairs)
    scorer = ev.InterpolationFeatures(decoder, feats, z, pairs, ALPHAS, levels=2)
    per_alpha = {alpha: scorer(a * n + np.arange(n)) for a, alpha in enumerate(ALPHAS)}
    real_rows = np.random.default_rng(5).random((9, 48)).astype(np.float32)
    real = stats_from_features(real_rows)
    real.features = real_rows
    acc = ev.FIDAccumulator(n, ALPHAS, real)
    tasks = np.random.default_rng(1).permutation(n * len(ALPHAS))
    for chunk in np.array_split(tasks, 4):
        pair_idx, alpha_idx = ev.split_tasks(chunk, n, ALPHAS)
        acc.add(chunk, np.concatenate([per_alpha[ALPHAS[a]][[i]] for i, a in zip(pair_idx, alpha_idx)]))
    acc.result()
    got = acc.kid_result()
    assert list(got) == ALPHAS
    for alpha in ALPHAS:
        assert got[alpha] == kid(per_alpha[alpha], real_rows, subsets=100, subset_size=1000, seed=0)
        assert got[alpha]["subsets"] == 100 and got[alpha]["subset_size"] == min(n, 9)
    assert (ev.KID_SUBSETS, ev.KID_SUBSET_SIZE, ev.KID_SEED) == (100, 1000, 0)
    assert got[0.5]["mean"] != got[0.0]["mean"]                  # per α, not one value reused
    # real features passed explicitly take precedence over the statistics' own
    other = ev.FIDAccumulator(n, [0.0], real, real_features=real_rows[:4] + 1, kid_subsets=7)
    other.add(np.arange(n), per_alpha[0.0])
    assert other.kid[0.0] == kid(per_alpha[0.0], real_rows[:4] + 1, subsets=7, subset_size=1000, seed=0)
    assert other.seconds["kid"] > 0 and other.seconds["frechet"] > 0


def test_degenerate_covariances_are_regularized(monkeypatch):
    """Fewer samples than feature dimensions (tiny runs): when pytorch-fid rejects a large imaginary part,
    the distance is recomputed with 1e-6 on both diagonals and flagged; a second failure is a FisherError."""
    rng = np.random.default_rng(0)
    gen, real = np.abs(rng.normal(size=(3, 64))), stats_from_features(np.abs(rng.normal(size=(5, 64))))
    assert ev.frechet(gen, real) == (fid(stats_from_features(gen), real), False)
    calls = []

    def flaky(a, b):
        calls.append((a.sigma[0, 0], b.sigma[0, 0]))
        if len(calls) == 1:
            raise ValueError("Imaginary component 0.5")
        return fid(a, b)

    monkeypatch.setattr(ev, "fid", flaky)
    value, regularized = ev.frechet(gen, real)
    g = stats_from_features(gen)
    assert regularized and math.isfinite(value)
    assert calls[1] == (g.sigma[0, 0] + 1e-6, real.sigma[0, 0] + 1e-6)
    monkeypatch.setattr(ev, "fid", lambda a, b: (_ for _ in ()).throw(ValueError("Imaginary component 9")))
    with pytest.raises(FisherError, match="numerically undefined for 3 generated vs 5 real"):
        ev.frechet(gen, real)


def test_edit_grid_images(setup):
    decoder, z, *_ = setup
    delta = torch.randn(8)
    out = ev.edit_grid_images(decoder, z[:3], delta, 3.0, levels=2)
    assert out.shape == (3, 3, 1, 28, 28)
    torch.testing.assert_close(out[:, 1], ev.decode_batches(decoder, z[:3], 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 2], ev.decode_batches(decoder, z[:3] + 3.0 * delta, 2), rtol=0, atol=1e-6)


def test_load_rows_by_id(tmp_path, mnist_dir):
    from fisher.data import MnistConfig, load_prepared, prepare_mnist
    prepare_mnist(MnistConfig(src=str(mnist_dir), limit=20, shard_size=8), str(tmp_path / "d"))
    full = load_prepared(str(tmp_path / "d"), "test")
    want = full["id"][[17, 3, 9, 3]]
    rows = ev.load_rows(str(tmp_path / "d"), "test", want, columns=("image", "label"))
    assert list(rows["id"]) == list(want)
    assert np.array_equal(rows["image"], full["image"][[17, 3, 9, 3]])
    assert np.array_equal(rows["label"], full["label"][[17, 3, 9, 3]])
    with pytest.raises(FisherError, match="1 ids of split 'test' are missing"):
        ev.load_rows(str(tmp_path / "d"), "test", [want[0], "nope"])


def test_real_features_scale(setup):
    feats = setup[3]
    imgs = np.random.default_rng(0).integers(0, 32, size=(3, 8, 8, 3), dtype=np.uint8)
    out = ev.real_features(feats, imgs, levels=32)
    assert out.dtype == np.float32 and out.shape == (3, 48)
    np.testing.assert_allclose(out.reshape(3, 3, 16).mean(2), imgs.reshape(3, 64, 3).mean(1) / 31, rtol=1e-5)
