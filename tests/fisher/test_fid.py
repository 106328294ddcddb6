"""FID (paper Algorithm 1): pytorch-fid's math and network, offline weight loading, cached statistics.

Inception forward passes cost about a second per image on a loaded 2-core machine, so the tests
share one model and a handful of images.
"""
import urllib.error

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from pytorch_fid import inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance

from fisher import fid
from fisher.io import FisherError

REAL_WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
needs_real = pytest.mark.skipif(not REAL_WEIGHTS.exists(), reason=f"{REAL_WEIGHTS} absent (set FISHER_SHARED_DATA)")
RAN = []   # set if a malicious pickle's payload ever runs


def _payload() -> None:
    RAN.append(True)


class Evil:
    def __reduce__(self):
        return _payload, ()


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """The real no-fc weights if present, else a random-init FID Inception state dict without fc."""
    if REAL_WEIGHTS.exists():
        return REAL_WEIGHTS
    net, gen = fid.fid_inception_arch(), torch.Generator().manual_seed(0)
    for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):   # He init: O(1) features
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=gen)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("weights") / "random-nofc.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def state_dict(weights_file):
    return torch.load(weights_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(weights_file):
    return fid.load_inception(str(weights_file))


@pytest.fixture(scope="module")
def rgb():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def rgb_feats(model, rgb):
    return fid.inception_features(model, rgb)


def _stats(seed: int, shift: float = 0.0, n: int = 200, d: int = 64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift


# --- Fréchet distance -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")   # inside pytorch-fid
def test_fid_matches_pytorch_fid_on_same_features():
    a, b = _stats(0), _stats(1, shift=0.5)
    ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    got = fid.fid(fid.stats_from_features(a), fid.stats_from_features(b))
    assert ref > 1
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
@pytest.mark.parametrize("n,m,d", [(10, 20, 64), (40, 150, 256), (50, 200, 2048)])
def test_fid_in_the_shared_span_equals_the_full_dimensional_fid(n, m, d):
    """Fewer feature rows than dimensions (every small-N FID): computed in the span of both sides' centred
    rows and the mean difference, the distance is pytorch-fid's full-dimensional value."""
    rng = np.random.default_rng(d)
    a = np.abs(rng.normal(size=(n, d))) * rng.random(d)           # pool3 features are non-negative
    b = np.abs(rng.normal(size=(m, d))) + 0.1 * rng.random(d)
    full = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    sa, sb = fid.stats_from_features(a), fid.stats_from_features(b)
    sa.features, sb.features = a, b.astype(np.float32)           # a cache keeps its rows as float32
    q = fid.shared_basis(sa, sb)
    assert q.shape == (d, n + m + 1) and np.allclose(q.T @ q, np.eye(n + m + 1), atol=1e-10)
    assert fid.fid(sa, sb) == pytest.approx(full, rel=1e-6)
    assert fid.fid(sb, sa) == pytest.approx(full, rel=1e-6)


def test_shared_span_only_with_every_row_and_fewer_rows_than_dimensions():
    a, b = _stats(0, n=20), _stats(1, n=30)
    sa, sb = fid.stats_from_features(a), fid.stats_from_features(b)
    assert fid.shared_basis(sa, sb) is None                       # no rows kept
    sa.features, sb.features = a, b[:10]
    assert fid.shared_basis(sa, sb) is None                       # a subset of b's rows: its range is unknown
    big = _stats(2, n=60)
    sb.features, sc = b, fid.stats_from_features(big)
    sc.features = big
    assert fid.shared_basis(sb, sc) is None                       # 30 + 60 + 1 rows span all 64 dimensions
    assert fid.shared_basis(sa, sb).shape == (64, 51)


def test_fid_self_zero_symmetric_and_pure_shift():
    a, b = fid.stats_from_features(_stats(0)), fid.stats_from_features(_stats(1, shift=0.5))
    scale = np.trace(a.sigma)
    assert abs(fid.fid(a, a)) < 1e-6 * scale
    assert fid.fid(a, b) == pytest.approx(fid.fid(b, a), rel=1e-6)
    # same covariance, shifted mean: FID = |shift|^2 exactly
    x, shift = _stats(2), np.random.default_rng(3).normal(size=64)
    assert fid.fid(fid.stats_from_features(x), fid.stats_from_features(x + shift)) == pytest.approx(shift @ shift,
                                                                                                     rel=1e-6)


def test_stats_need_matching_dims_and_two_rows():
    with pytest.raises(FisherError, match="at least 2"):
        fid.stats_from_features(np.zeros((1, 8)))
    with pytest.raises(FisherError, match="dimension"):
        fid.fid(fid.stats_from_features(_stats(0, d=4)), fid.stats_from_features(_stats(0, d=5)))


def test_stats_cache_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _stats(4)

    first = fid.cached_real_stats(str(tmp_path / "cache"), "abc-train-w1", compute)
    second = fid.cached_real_stats(str(tmp_path / "cache"), "abc-train-w1", compute)
    assert len(calls) == 1 and (tmp_path / "cache" / "fid-stats-abc-train-w1.npz").exists()
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert first.count == second.count == 200
    fid.cached_real_stats(str(tmp_path / "cache"), "other", compute)
    assert len(calls) == 2


def test_stats_cache_keeps_real_features_and_recomputes_old_caches(tmp_path):
    """With keep_features, the cache keeps the real rows KID needs (all of them up to the cap, else a seeded
    subset); a cache written without them (before KID) is recomputed and replaced, not an error."""
    feats, calls = _stats(4), []

    def compute():
        calls.append(1)
        return feats
    cache = str(tmp_path / "cache")
    uri = tmp_path / "cache" / "fid-stats-k.npz"
    old = fid.cached_real_stats(cache, "k", compute)                      # an old-style cache: no features
    assert old.features is None and fid.cache_status(str(uri), 50) == "no-features"
    assert fid.cache_status(str(uri)) == "usable" and fid.cache_status(str(tmp_path / "none.npz"), 50) == "absent"
    new = fid.cached_real_stats(cache, "k", compute, keep_features=50)
    assert len(calls) == 2 and fid.cache_status(str(uri), 50) == "usable"
    keep = fid.kept_rows(200, 50)
    assert len(keep) == 50 and np.all(np.diff(keep) > 0) and np.array_equal(keep, fid.kept_rows(200, 50))
    np.testing.assert_array_equal(new.features, feats[keep].astype(np.float32))
    again = fid.cached_real_stats(cache, "k", compute, keep_features=50)      # reused: features loaded
    assert len(calls) == 2 and again.features.dtype == np.float32
    np.testing.assert_array_equal(again.features, new.features)
    np.testing.assert_array_equal(again.mu, old.mu)
    assert fid.cache_status(str(uri), 300) == "no-features"                 # another cap: recomputed
    assert len(fid.cached_real_stats(cache, "k", compute, keep_features=300).features) == 200 and len(calls) == 3
    assert np.array_equal(fid.kept_rows(7, 10), np.arange(7)) and fid.REAL_FEATURES_KEPT == 10_000


def test_corrupt_stats_file(tmp_path):
    (tmp_path / "s.npz").write_bytes(b"not an npz")
    with pytest.raises(FisherError, match="corrupt FID statistics"):
        fid.FIDStats.load(str(tmp_path / "s.npz"))


# --- images -----------------------------------------------------------------------------------------

def test_to_unit_float():
    imgs = np.random.default_rng(0).integers(0, 32, size=(3, 5, 4, 3), dtype=np.uint8)
    out = fid.to_unit_float(imgs, levels=32)
    assert out.dtype == np.float32 and out.shape == (3, 3, 5, 4)
    np.testing.assert_allclose(out, imgs.transpose(0, 3, 1, 2) / 31)
    with pytest.raises(FisherError, match="levels"):
        fid.to_unit_float(imgs, levels=2)


def test_features_reject_bad_images(model):
    with pytest.raises(FisherError, match=r"\[0, 1\]"):
        fid.inception_features(model, torch.full((1, 3, 8, 8), 255.0))
    with pytest.raises(FisherError, match="shape"):
        fid.inception_features(model, torch.zeros(1, 2, 8, 8))


# --- Inception weights and features -----------------------------------------------------------------

@needs_real
def test_real_weights_load_into_model(model, state_dict):
    assert model.weights_id == (REAL_WEIGHTS.parent / (REAL_WEIGHTS.name + ".sha256")).read_text()[:16]
    assert "fc.weight" not in state_dict
    torch.testing.assert_close(model.blocks[0][0].conv.weight, state_dict["Conv2d_1a_3x3.conv.weight"])
    torch.testing.assert_close(model.blocks[3][2].branch_pool.bn.running_var,
                               state_dict["Mixed_7c.branch_pool.bn.running_var"])


def test_features_shapes_and_grey(model, rgb_feats):
    assert rgb_feats.shape == (2, 2048) and rgb_feats.dtype == np.float64 and np.isfinite(rgb_feats).all()
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    g1 = fid.inception_features(model, grey.numpy(), batch_size=1)
    g3 = fid.inception_features(model, grey[:1].repeat(1, 3, 1, 1))
    assert g1.shape == (2, 2048)
    scale = np.abs(g1).max()
    np.testing.assert_allclose(g1[:1], g3, rtol=1e-5, atol=1e-6 * scale)
    assert np.abs(g1[0] - g1[1]).max() > 1e-3 * scale


def test_same_features_as_pytorch_fid_download_path(monkeypatch, state_dict, rgb, rgb_feats):
    """pytorch-fid's own InceptionV3 (its download path, fed the same tensors plus an fc) gives our features."""
    full = {**state_dict, "fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)}
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: full)
    ref = fid.load_inception()
    assert isinstance(ref, pfi.InceptionV3) and ref.weights_id == "pt_inception-2015-12-05-6726825d"
    np.testing.assert_allclose(fid.inception_features(ref, rgb), rgb_feats, rtol=1e-5,
                               atol=1e-6 * np.abs(rgb_feats).max())


def test_offline_without_weights_says_what_to_pass(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(pfi, "load_state_dict_from_url", offline)
    with pytest.raises(FisherError, match="--fid-weights PATH or set FISHER_FID_WEIGHTS") as e:
        fid.load_inception()
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and "\n" not in str(e.value)


def _tiny(state_dict, drop=(), add=()):
    """Same key names, 1-element tensors: the key check comes before any tensor is copied."""
    return {**{k: torch.zeros(1) for k in state_dict if k not in drop}, **{k: torch.zeros(1) for k in add}}


@pytest.mark.parametrize("drop, add, named", [
    (("Mixed_6c.branch7x7_2.conv.weight",), (), "missing keys Mixed_6c.branch7x7_2.conv.weight"),
    ((), ("Mixed_8a.conv.weight",), "unexpected keys Mixed_8a.conv.weight"),
])
def test_wrong_keys_are_named(tmp_path, state_dict, drop, add, named):
    path = tmp_path / "w.pth"
    torch.save(_tiny(state_dict, drop, add), path)
    with pytest.raises(FisherError, match=named) as e:
        fid.load_inception(str(path))
    assert str(path) in str(e.value) and "pt_inception-2015-12-05" in str(e.value)


def test_wrong_shapes_and_env_var(tmp_path, monkeypatch, state_dict):
    path = tmp_path / "shapes.pth"
    torch.save(_tiny(state_dict), path)
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(path))
    with pytest.raises(FisherError, match="shapes do not fit") as e:
        fid.load_inception()
    assert str(path) in str(e.value)


@pytest.mark.parametrize("obj", [Evil(), {"Conv2d_1a_3x3.conv.weight": Evil()}, [torch.zeros(1)], b"garbage"])
def test_not_a_tensor_state_dict(tmp_path, obj):
    path = tmp_path / "bad.pth"
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        torch.save(obj, path)
    with pytest.raises(FisherError, match="state dict") as e:
        fid.load_inception(str(path))
    assert str(path) in str(e.value) and not RAN
