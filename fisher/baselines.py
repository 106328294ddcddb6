"""Baselines that need no learned model (Yan, Ho, Abbeel, sec. 5).

* :func:`independent_pixel_nll`: every sub-pixel its own categorical distribution (a Bernoulli for
  binary data), fitted by counting on the train split. It ignores all dependence between pixels, so a
  prior (the PixelCNNs of sec. 5.1) is only worth using well below its NLL: about 205.9 nats per image
  on binarized MNIST test, against about 81 for a PixelCNN (Gulrajani et al., PixelVAE, Table 1).
* :func:`pixel_interpolations`: (1 - α) x₁ + α x₂ directly in pixel space, the paper's qualitative
  comparison for its interpolations through the Fisher-score embedding (sec. 5.2): a cross-fade of two
  images, which leaves the data manifold half-way.

Pure NumPy.
"""
from __future__ import annotations

import numpy as np

from fisher.io import FisherError

CHUNK = 1024   # images counted / scored at a time: memory O(CHUNK · sub-pixels) whatever the split size


def _images(images, levels: int, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim < 2 or len(images) == 0 or images[0].size == 0:
        raise FisherError(f"{what}: need a non-empty batch of images (N, ...), got shape {images.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or images.dtype == bool):
        raise FisherError(f"{what}: need integer sub-pixel values in [0, {levels}), got dtype {images.dtype}")
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi >= levels:
        raise FisherError(f"{what}: values in [{lo}, {hi}] do not fit levels = {levels}; "
                          "pass the dataset's number of levels")
    return images.reshape(len(images), -1)


def pixel_counts(images: np.ndarray, levels: int) -> np.ndarray:
    """int64 [sub-pixels, levels]: how many images take each value at each sub-pixel (``images`` flat (N, D))."""
    n, d = images.shape
    counts = np.zeros(d * levels, np.int64)
    offsets = np.arange(d, dtype=np.int64) * levels
    for start in range(0, n, CHUNK):
        counts += np.bincount((images[start:start + CHUNK].astype(np.int64) + offsets).ravel(),
                              minlength=d * levels)
    return counts.reshape(d, levels)


def independent_pixel_log_probs(counts: np.ndarray) -> np.ndarray:
    """log p [sub-pixels, levels] with add-one (Laplace) smoothing: p(v) = (count(v) + 1) / (N + levels),
    N the train images; a value never seen at a sub-pixel keeps a finite probability 1 / (N + levels)."""
    return np.log(counts + 1.0) - np.log(counts.sum(1, keepdims=True) + counts.shape[1])


def independent_pixel_nll(train_images, test_images, levels: int) -> dict:
    """Mean test NLL of the independent-pixel model fitted on ``train_images`` (one categorical per sub-pixel,
    a Bernoulli for levels = 2, add-one smoothed: :func:`independent_pixel_log_probs`).

    Images: integers in [0, levels), shape (N, H, W, C) as stored (any (N, ...) layout, the same for
    both). Returns {nll_nats_per_image, bits_per_dim (= nats / (sub-pixels · ln 2)), n_train, n_test,
    dims, levels, smoothing}."""
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 2:
        raise FisherError(f"independent-pixel baseline: levels must be an integer >= 2, got {levels!r}")
    train = _images(train_images, levels, "independent-pixel baseline train_images")
    test = _images(test_images, levels, "independent-pixel baseline test_images")
    if np.shape(train_images)[1:] != np.shape(test_images)[1:]:
        raise FisherError(f"independent-pixel baseline: train images {np.shape(train_images)[1:]} and test "
                          f"images {np.shape(test_images)[1:]} differ in shape")
    log_p = independent_pixel_log_probs(pixel_counts(train, int(levels)))
    dims = np.arange(test.shape[1])
    total = sum(-log_p[dims, test[s:s + CHUNK].astype(np.int64)].sum() for s in range(0, len(test), CHUNK))
    nll = float(total / len(test))
    return {"nll_nats_per_image": nll, "bits_per_dim": float(nll / (test.shape[1] * np.log(2))),
            "n_train": len(train), "n_test": len(test), "dims": int(test.shape[1]), "levels": int(levels),
            "smoothing": "add-one (Laplace): (count + 1) / (N + levels)"}


def _unit_images(x, levels: int | None, what: str) -> np.ndarray:
    """float32 (P, C, H, W) in [0, 1]: floats as given, or integers (P, H, W, C) in [0, levels) / (levels - 1)."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.size == 0:
        raise FisherError(f"pixel interpolation {what}: need images (P, C, H, W) or one (C, H, W), got {x.shape}")
    if levels is not None:
        x = _images(x, levels, f"pixel interpolation {what}").reshape(x.shape)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(levels - 1)
    if not np.issubdtype(x.dtype, np.floating) or not ((x >= 0) & (x <= 1)).all():
        raise FisherError(f"pixel interpolation {what}: need floats in [0, 1] (or pass levels for integer "
                          "images as stored)")
    return x.astype(np.float32, copy=False)


def pixel_interpolations(x1, x2, alphas, levels: int | None = None) -> np.ndarray:
    """float32 (P, A, C, H, W) in [0, 1]: (1 - α) x₁ + α x₂ for each pair p and each α of ``alphas``
    (in [0, 1]); α = 0 gives x₁ and α = 1 gives x₂ exactly. The paper's pixel-space comparison (sec. 5.2).

    ``x1``, ``x2``: floats in [0, 1] of shape (P, C, H, W) (or one image (C, H, W)), or with ``levels``
    integer images (P, H, W, C) in [0, levels) as stored, scaled by 1 / (levels - 1) like
    :func:`fisher.fid.to_unit_float`."""
    a, b = _unit_images(x1, levels, "x1"), _unit_images(x2, levels, "x2")
    if a.shape != b.shape:
        raise FisherError(f"pixel interpolation: x1 {a.shape} and x2 {b.shape} differ in shape")
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if alphas.size == 0 or not ((alphas >= 0) & (alphas <= 1)).all():
        raise FisherError(f"pixel interpolation: need alphas in [0, 1], got {alphas.tolist()}")
    al = alphas.reshape(1, -1, 1, 1, 1)
    out = (1.0 - al) * a[:, None].astype(np.float64) + al * b[:, None].astype(np.float64)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
