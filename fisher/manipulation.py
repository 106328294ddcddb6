"""Manipulation in the embedding space (paper sec. 4.3, 5.2 "Semantic Manipulation", Algorithm 1).

* Interpolation: ẑ = (1 - α) z₁ + α z₂, decoded by the learned decoder.
* Attribute editing (as in Glow): δ = mean(z | attr) - mean(z | not attr);
  z + scale·δ adds the attribute, a negative scale removes it (paper: scale 3).
* Algorithm 1 draws random pairs (x₁, x₂) of the dataset and decodes their
  interpolations at each α in :data:`ALPHAS` for the FID evaluation.
"""
from __future__ import annotations

import numpy as np
import torch

from fisher.io import FisherError

ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5)   # Algorithm 1 / Figure 3b; α and 1-α score alike


def interpolate(z1, z2, alphas) -> torch.Tensor:
    """Tensor[len(alphas), dim]: row i is (1 - αᵢ) z1 + αᵢ z2; α = 0 gives z1 and α = 1 gives z2 exactly."""
    z1, z2 = torch.as_tensor(z1), torch.as_tensor(z2)
    if z1.shape != z2.shape or z1.dim() != 1:
        raise FisherError(f"interpolate: z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must be vectors of one size")
    a = torch.as_tensor(alphas, dtype=z1.dtype).reshape(-1, 1)
    return torch.lerp(z1.expand(len(a), -1), z2.expand(len(a), -1), a)   # exact at both ends


def attribute_direction(z, has_attr, name: str | None = None) -> torch.Tensor:
    """δ = mean(z | attr) - mean(z | not attr), Tensor[dim], in ``z``'s dtype (means in float64)."""
    z = torch.as_tensor(z)
    mask = torch.as_tensor(np.asarray(has_attr, dtype=bool))
    what = f"attribute {name!r}" if name else "the attribute"
    if z.dim() != 2 or mask.shape != (z.shape[0],):
        raise FisherError(f"attribute_direction: need z (N, dim) and one flag per row for {what}; "
                          f"got z {tuple(z.shape)} and {tuple(mask.shape)} flags")
    n_pos = int(mask.sum())
    if n_pos == 0 or n_pos == len(mask):
        side = "with" if n_pos == 0 else "without"
        raise FisherError(f"no embeddings {side} {what} among {len(mask)} rows; "
                          "use more data or another split to form both groups")
    zd = z.double()
    return (zd[mask].mean(0) - zd[~mask].mean(0)).to(z.dtype)


def edit(z, delta, scale: float = 3.0) -> torch.Tensor:
    """z + scale·δ (paper: scale 3 adds the attribute; a negative scale removes it). ``z``: (dim,) or (N, dim)."""
    return torch.as_tensor(z) + scale * torch.as_tensor(delta)


def random_pairs(n_items: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    """int64 [n_pairs, 2] of index pairs (i, j), i != j, uniform over ordered pairs; a pure function of the arguments."""
    if n_items < 2:
        raise FisherError(f"random_pairs: need at least 2 items to pair, got {n_items}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n_items, n_pairs)
    second = (first + rng.integers(1, n_items, n_pairs)) % n_items
    return np.stack([first, second], axis=1).astype(np.int64)
