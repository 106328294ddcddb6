"""Image layouts of the manipulation figures: interpolation strips (paper Figures 2 and 4) and
attribute-edit grids (paper sec. 5.2, Figure 5).

Inputs are what the stages have at hand: decoded images as float (…, C, H, W) arrays or tensors on
[0, 1] (the decoder's expected value, :func:`fisher.evaluation.decode_interpolations` /
:func:`fisher.evaluation.edit_grid_images`) and true images as stored in the prepared shards (uint8
(…, H, W, C) with values in [0, levels)). Outputs are one uint8 (H, W, C) image, ready for
:func:`fisher.images.save_png`. Pure functions: no files, no ray.
"""
from __future__ import annotations

import numpy as np

from fisher.fid import to_unit_float
from fisher.images import grid, interpolation_strip, to_uint8


def _float_array(images) -> np.ndarray:
    """A float tensor or array as a NumPy array (on the CPU)."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    return np.asarray(images)


def true_tiles(images, levels: int) -> np.ndarray:
    """Dataset images uint8 (N, H, W, C) with values in [0, levels) → uint8 (N, H, W, C) on [0, 255]."""
    return to_uint8(to_unit_float(images, levels))


def interpolation_image(decoded, true_pairs, levels: int, pad: int = 2) -> np.ndarray:
    """Figures 2c / 4c: one row per pair, [x₁, E[Dec((1 - α) z₁ + α z₂)] for each α, x₂].

    ``decoded``: float (P, A, C, H, W) on [0, 1]; ``true_pairs``: the pairs' dataset images, uint8
    (P, 2, H, W, C) with values in [0, levels). Returns uint8 (P·(H+pad)+pad, (A+2)·(W+pad)+pad, C).
    """
    d = _float_array(decoded)
    p, a = d.shape[:2]
    tiles = to_uint8(d.reshape(p * a, *d.shape[2:])).reshape(p, a, *d.shape[3:], d.shape[2])
    t = np.asarray(true_pairs)
    true = true_tiles(t.reshape(-1, *t.shape[2:]), levels).reshape(p, 2, *tiles.shape[2:])
    return interpolation_strip(true[:, 0], true[:, 1], tiles, pad)


def edit_image(true, edited, levels: int, pad: int = 2) -> np.ndarray:
    """Figure 5: one row per image, [x, E[Dec(z - s·δ)], E[Dec(z)], E[Dec(z + s·δ)]].

    ``true``: dataset images uint8 (N, H, W, C) with values in [0, levels); ``edited``: float
    (N, 3, C, H, W) on [0, 1] (minus, reconstruction, plus). Returns uint8 (N·(H+pad)+pad, 4·(W+pad)+pad, C).
    """
    t = true_tiles(true, levels)
    e = _float_array(edited)
    tiles = to_uint8(e.reshape(-1, *e.shape[2:])).reshape(len(t), e.shape[1], *t.shape[1:])
    return grid(np.concatenate([t[:, None], tiles], axis=1), pad)
