"""Fréchet Inception Distance for interpolation FID (Yan, Ho, Abbeel,
Algorithm 1 and sec. 5.2: FID of decoded interpolations at α ∈ {0, .125, .25,
.375, .5} against real images; DESIGN.md step 5, "Evaluate").

The Inception network and the Fréchet distance are pytorch-fid's own
(``InceptionV3`` with the FID Inception of the TF inception-2015-12-05 graph,
pool3 features, and ``calculate_frechet_distance``). This module only adds
offline weight loading, batching, grey → RGB, and cached statistics (which also keep up to
:data:`REAL_FEATURES_KEPT` real feature rows, for KID).

Beyond the paper, :func:`kid` gives the Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying
MMD GANs", sec. 3 / appendix) on the same pool3 features: unlike FID it has an unbiased estimator, so
values from different sample sizes are comparable and small evaluations are not biased upwards.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from pytorch_fid import inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance
from torch import nn

from fisher.io import FisherError, atomic_write_bytes, exists, join, read_bytes

WEIGHTS_ENV = "FISHER_FID_WEIGHTS"
OFFICIAL_NAME = pfi.FID_WEIGHTS_URL.rsplit("/", 1)[-1]   # pt_inception-2015-12-05-6726825d.pth
OPTIONAL_KEYS = frozenset({"fc.weight", "fc.bias"})     # the classifier: FID does not use it
FEATURE_DIM = 2048
_HINT = f"pass pytorch-fid's pt_inception-2015-12-05 weights ({OFFICIAL_NAME})"


def fid_inception_arch() -> torchvision.models.Inception3:
    """pytorch-fid's ``fid_inception_v3()`` network, uninitialised and without its download."""
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class PoolFeatures(pfi.InceptionV3):
    """pytorch-fid's ``InceptionV3(output_blocks=[3])`` (resize to 299, scale to [-1, 1]) around a given
    FID Inception; the blocks are exactly those ``InceptionV3.__init__`` builds, and ``forward`` is its own."""

    def __init__(self, net: torchvision.models.Inception3):
        nn.Module.__init__(self)
        self.resize_input = self.normalize_input = True
        self.output_blocks, self.last_needed_block = [3], 3
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)
        self.blocks = nn.ModuleList([
            nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool()),
            nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, pool()),
            nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                          net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e),
            nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))),
        ])
        self.requires_grad_(False)


def _read_state_dict(uri: str) -> tuple[dict[str, torch.Tensor], bytes]:
    """A plain tensor state dict from ``uri`` (weights_only: never runs pickled code), and the raw bytes."""
    data = read_bytes(uri)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:   # not a torch file at all (text: KeyError, ...), a pickle carrying code, truncated
        raise FisherError(f"{uri}: not a plain tensor state dict ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); {_HINT}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise FisherError(f"{uri}: not a state dict of named tensors (got {type(sd).__name__}); {_HINT}")
    return sd, data


def _check_keys(uri: str, got: set[str], expected: set[str]) -> None:
    """FisherError naming the first few missing / unexpected keys (only the fc classifier may be absent)."""
    missing, unexpected = sorted(expected - got - OPTIONAL_KEYS), sorted(got - expected)
    problems = [f"{what} keys {', '.join(keys[:4])}{', …' if len(keys) > 4 else ''} ({len(keys)} in all)"
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise FisherError(f"{uri}: not FID Inception weights: {'; '.join(problems)}; {_HINT}")


def _from_file(uri: str) -> tuple[nn.Module, str]:
    sd, data = _read_state_dict(uri)
    net = fid_inception_arch()
    _check_keys(uri, set(sd), set(net.state_dict()))
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise FisherError(f"{uri}: tensor '{bad}' holds NaN or Inf; {_HINT}")
    try:
        net.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise FisherError(f"{uri}: tensor shapes do not fit the FID Inception ({str(e).splitlines()[-1].strip()}); "
                          f"{_HINT}") from e
    return PoolFeatures(net), hashlib.sha256(data).hexdigest()[:16]


def _downloaded() -> tuple[nn.Module, str]:
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise FisherError(f"cannot download the FID Inception weights ({str(e).splitlines()[0][:200]}); "
                          f"pass --fid-weights PATH or set {WEIGHTS_ENV} to a copy of {OFFICIAL_NAME}") from e
    return model, OFFICIAL_NAME.removesuffix(".pth")


def load_inception(weights: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """pytorch-fid's FID InceptionV3 mapping images in [0, 1] to 2048-d pool3 features, in eval mode.

    ``weights`` (path or URI; default ``$FISHER_FID_WEIGHTS``) is a pytorch-fid-layout state dict; ``fc.*``
    may be missing. Without one, pytorch-fid downloads (or reuses its cached copy of) the official file.
    The returned module has ``weights_id``: the weights file's sha256 prefix (for stats cache keys).
    """
    weights = weights or os.environ.get(WEIGHTS_ENV) or None
    model, weights_id = _from_file(weights) if weights else _downloaded()
    model.weights_id = weights_id
    return model.to(device).eval()


def inception_features(model: nn.Module, images, batch_size: int = 50,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """Pool3 features ``[N, 2048]`` float64 of ``images``: floats in [0, 1], shape (N, C, H, W), C = 1 or 3
    (grey is repeated to 3 channels)."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FisherError(f"FID images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    model.to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device=device, dtype=torch.float32)
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise FisherError(f"FID images must be floats in [0, 1], got range [{x.min():g}, {x.max():g}]; "
                                  "convert with fisher.fid.to_unit_float")
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            y = model(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            out.append(y.flatten(1).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, FEATURE_DIM))


def to_unit_float(images: np.ndarray, levels: int) -> np.ndarray:
    """uint8 images (N, H, W, C) with values in [0, levels) → float32 (N, C, H, W) in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise FisherError(f"expected images of shape (N, H, W, C), got {images.shape}")
    if levels < 2 or (images.size and images.max() > levels - 1):
        raise FisherError(f"image values exceed levels - 1 = {levels - 1}; pass the dataset's number of levels")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(levels - 1)


REAL_FEATURES_KEPT = 10_000     # real feature rows a statistics cache keeps for KID (float32: 82 MB at D = 2048)


@dataclass
class FIDStats:
    """Gaussian fit of Inception features: mean, covariance, the number of images, and optionally (for KID)
    up to :data:`REAL_FEATURES_KEPT` of the feature rows themselves (float32 [M, D], see :func:`kept_rows`)."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None

    def save(self, uri: str) -> None:
        buf = io.BytesIO()
        extra = {} if self.features is None else {"features": np.asarray(self.features, np.float32)}
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=np.int64(self.count), **extra)
        atomic_write_bytes(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str) -> FIDStats:
        try:
            with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as z:
                stats = cls(z["mu"], z["sigma"], int(z["count"]), z["features"] if "features" in z.files else None)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            raise FisherError(f"{uri}: corrupt FID statistics ({e}); delete it and rerun") from e
        if stats.mu.ndim != 1 or stats.sigma.shape != (len(stats.mu),) * 2 or (
                stats.features is not None and (stats.features.ndim != 2 or stats.features.shape[1] != len(stats.mu))):
            raise FisherError(f"{uri}: corrupt FID statistics (mu {stats.mu.shape}, sigma {stats.sigma.shape}"
                              + ("" if stats.features is None else f", features {stats.features.shape}")
                              + "); delete it and rerun")
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()
                and (stats.features is None or np.isfinite(stats.features).all())):
            raise FisherError(f"{uri}: corrupt FID statistics (NaN or Inf values); delete it and rerun")
        return stats


def stats_from_features(feats: np.ndarray) -> FIDStats:
    """Mean and covariance (``np.cov(rowvar=False)``) of features ``[N, D]``, as pytorch-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise FisherError(f"FID needs at least 2 feature rows of shape [N, D], got {feats.shape}")
    if not np.isfinite(feats).all():
        raise FisherError(f"Inception features hold NaN or Inf in {int((~np.isfinite(feats)).any(1).sum())} of "
                          f"{len(feats)} rows; check the images and the FID weights")
    return FIDStats(np.mean(feats, axis=0), np.cov(feats, rowvar=False), len(feats))


def fid(stats_a: FIDStats, stats_b: FIDStats) -> float:
    """Fréchet distance between two feature Gaussians (pytorch-fid's ``calculate_frechet_distance``).

    When both statistics carry all their feature rows and there are fewer rows than dimensions (every
    small-N FID: 150 pairs against 1 000 real images in 2 048 dimensions), the distance is computed
    by the same pytorch-fid function in an orthonormal basis of the subspace the two covariances and
    the mean difference span (:func:`shared_basis`). FID is invariant under that change of basis and
    both Gaussians are degenerate outside it, so the value is the same, at a fraction of the cost of
    a 2 048 × 2 048 matrix square root (about 30 s on this project's 2-core CI machine)."""
    if stats_a.mu.shape != stats_b.mu.shape:
        raise FisherError(f"FID statistics differ in dimension ({stats_a.mu.shape[0]} vs {stats_b.mu.shape[0]})")
    args = (stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    q = shared_basis(stats_a, stats_b)
    if q is not None:
        small = (q.T @ stats_a.mu, q.T @ stats_a.sigma @ q, q.T @ stats_b.mu, q.T @ stats_b.sigma @ q)
        kept = [np.trace(s) for s in small[1::2]], [np.trace(s) for s in args[1::2]]
        if np.allclose(*kept, rtol=1e-7, atol=0):     # the basis holds both covariances (it always should)
            args = small
    with warnings.catch_warnings():   # pytorch-fid passes scipy's deprecated sqrtm(disp=...)
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(calculate_frechet_distance(*args))


def shared_basis(stats_a: FIDStats, stats_b: FIDStats) -> np.ndarray | None:
    """Orthonormal columns [D, k] spanning both covariances' ranges (the centred feature rows) and the mean
    difference, or None when a side lacks its full feature rows or k would not be below D."""
    if any(s.features is None or len(s.features) != s.count for s in (stats_a, stats_b)):
        return None
    cols = np.concatenate([np.asarray(stats_a.features, np.float64) - stats_a.mu,
                           np.asarray(stats_b.features, np.float64) - stats_b.mu,
                           (stats_a.mu - stats_b.mu)[None]])
    if len(cols) >= cols.shape[1]:
        return None
    return np.linalg.qr(cols.T)[0]


def kept_rows(count: int, keep: int = REAL_FEATURES_KEPT, seed: int = 0) -> np.ndarray:
    """Indices of the feature rows a statistics cache keeps for KID: all ``count`` rows if ``count <= keep``,
    else ``keep`` rows drawn without replacement by NumPy ``default_rng(seed)``, sorted."""
    if count <= keep:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, keep, replace=False))


def cache_status(uri: str, keep_features: int | None = None) -> str:
    """``'absent'``, ``'usable'``, or ``'no-features'``: a cache made before KID (or with another cap) that
    lacks the ``min(count, keep_features)`` real feature rows asked for, and is recomputed."""
    if not exists(uri):
        return "absent"
    if keep_features is None:
        return "usable"
    stats = FIDStats.load(uri)
    ok = stats.features is not None and len(stats.features) == min(stats.count, keep_features)
    return "usable" if ok else "no-features"


def cached_real_stats(cache_dir: str, key: str, compute: Callable[[], np.ndarray],
                      keep_features: int | None = None) -> FIDStats:
    """Statistics in ``cache_dir/fid-stats-{key}.npz``, computed from ``compute()``'s features and saved if absent.

    With ``keep_features`` (e.g. :data:`REAL_FEATURES_KEPT`), the statistics also keep
    :func:`kept_rows` of the features (``.features``, for KID); a cache file without them (written
    before KID) is recomputed and replaced, not an error.
    """
    uri = join(cache_dir, f"fid-stats-{key}.npz")
    if cache_status(uri, keep_features) == "usable":
        return FIDStats.load(uri)
    feats = np.asarray(compute())
    stats = stats_from_features(feats)
    if keep_features is not None:
        stats.features = feats[kept_rows(len(feats), keep_features)].astype(np.float32)
    stats.save(uri)
    return stats


# ---------------------------------------------------------------- KID (beyond the paper)

def _check_features(features, what: str) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2 or feats.shape[1] < 1:
        raise FisherError(f"KID {what}: need at least 2 feature rows of shape [N, D], got {feats.shape}")
    if not np.isfinite(feats).all():
        raise FisherError(f"KID {what}: features hold NaN or inf; recompute them")
    return feats


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel matrix k(xᵢ, yⱼ) = (xᵢ·yⱼ / d + 1)³, d the feature dimension (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between equal-size samples x, y [m, d] under :func:`polynomial_kernel`:
    Σ_{i≠j} k(xᵢ,xⱼ)/(m(m-1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(m(m-1)) - 2 Σ_{i,j} k(xᵢ,yⱼ)/m²
    (torchmetrics' ``poly_mmd`` and clean-fid's ``kernel_distance`` compute the same)."""
    m = len(x)
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * polynomial_kernel(x, y).sum() / m ** 2)


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel Inception Distance between feature sets ``[Na, D]`` and ``[Nb, D]`` (e.g. pool3 features of
    :func:`inception_features`), as torchmetrics' ``KernelInceptionDistance`` / clean-fid compute it.

    Each of ``subsets`` rounds draws ``m = min(subset_size, Na, Nb)`` rows of each set without replacement
    (NumPy ``default_rng(seed)``, so the result is a pure function of the arguments) and takes
    :func:`mmd2_unbiased`. Returns ``mean`` (the KID), ``std`` over rounds (population std, as torchmetrics),
    ``stderr`` = sample std / √subsets (the spread due to subset sampling only; NaN for one round),
    ``subsets`` and the ``subset_size`` m actually used. With m = Na = Nb every round gives the same value.
    """
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise FisherError(f"KID: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if subsets < 1 or subset_size < 2:
        raise FisherError(f"KID: need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(a[rng.choice(len(a), m, replace=False)],
                                     b[rng.choice(len(b), m, replace=False)]) for _ in range(subsets)])
    stderr = float(values.std(ddof=1) / np.sqrt(subsets)) if subsets > 1 else float("nan")
    return {"mean": float(values.mean()), "std": float(values.std()), "stderr": stderr,
            "subsets": int(subsets), "subset_size": int(m)}
