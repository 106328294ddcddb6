"""Image grids as PNG: reconstructions, interpolation strips and attribute edits
(paper Figures 2, 4, 5). Arrays are uint8 (…, H, W, C); files go through
:func:`fisher.io.atomic_write_bytes`, so local paths and s3:// / gs:// URIs work."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from fisher.io import FisherError, atomic_write_bytes


def to_uint8(images) -> np.ndarray:
    """Float images on [0, 1], (N, C, H, W) tensor or array → uint8 (N, H, W, C), rounded and clipped."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 tiles (rows, cols, H, W, C) → one uint8 image (rows·(H+pad)+pad, cols·(W+pad)+pad, C)."""
    a = np.asarray(images)
    if a.ndim != 5 or a.dtype != np.uint8:
        raise FisherError(f"grid: need uint8 tiles (rows, cols, H, W, C), got {a.dtype} {a.shape}")
    rows, cols, h, w, c = a.shape
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
    for r in range(rows):
        for k in range(cols):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            out[y:y + h, x:x + w] = a[r, k]
    return out


def interpolation_strip(true_a, true_b, decoded, pad: int = 2) -> np.ndarray:
    """Figure 2c/4c layout: each row is [x₁, Dec(ẑ_α) for each α, x₂].

    ``true_a``, ``true_b``: uint8 (N, H, W, C) (or one image (H, W, C));
    ``decoded``: uint8 (N, n_alpha, H, W, C) (or (n_alpha, H, W, C) for one row).
    """
    a, b, d = np.asarray(true_a), np.asarray(true_b), np.asarray(decoded)
    if d.ndim == 4:
        a, b, d = a[None], b[None], d[None]
    if a.shape != b.shape or a.shape[0] != d.shape[0] or a.shape[1:] != d.shape[2:]:
        raise FisherError(f"interpolation_strip: true images {a.shape}/{b.shape} do not fit decoded {d.shape}")
    return grid(np.concatenate([a[:, None], d, b[:, None]], axis=1), pad)


def png_bytes(array) -> bytes:
    """Encode uint8 (H, W), (H, W, 1) as grey (L) or (H, W, 3) as RGB PNG."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3))):
        raise FisherError(f"PNG: need uint8 (H, W), (H, W, 1) or (H, W, 3), got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def save_png(uri, array) -> None:
    """Write ``array`` as a PNG to a local path or URI, atomically."""
    atomic_write_bytes(str(uri), png_bytes(array))
