"""Autoregressive priors p_θ(x) (paper sec. 3.1, appendix 7.1), one module per family.

* :func:`build_prior` — ``build_prior("pixelcnn", channels=1, levels=2, n_layers=5)``;
* :func:`load_prior` / :func:`save_prior` — checkpoints (:mod:`fisher.checkpoints`);
* :data:`PRIORS` — the registry; ``PRIORS.names()`` lists the families.

Importing this package registers every family in it.
"""
from __future__ import annotations

import torch

from fisher import checkpoints
from fisher.priors.base import Prior
from fisher.priors.registry import PRIORS
from fisher.priors import gated as _gated  # noqa: F401  (registers "gated")
from fisher.priors import pixelcnn as _pixelcnn  # noqa: F401  (registers "pixelcnn")
from fisher.priors import pixelvae as _pixelvae  # noqa: F401  (registers "pixelvae")
from fisher.priors.gated import GatedPixelCNN, GatedPixelCNNConfig
from fisher.priors.pixelcnn import PixelCNN, PixelCNNConfig
from fisher.priors.pyramid import PyramidPixelCNN, PyramidPixelCNNConfig  # noqa: F401  (registers "pyramid")
from fisher.priors import realnvp as _realnvp  # noqa: F401  (registers "realnvp")

__all__ = ["PRIORS", "Prior", "PixelCNN", "PixelCNNConfig", "GatedPixelCNN", "GatedPixelCNNConfig", "PyramidPixelCNN", "PyramidPixelCNNConfig", "build_prior", "load_prior", "save_prior",
           "prior_files", "prior_from_files", "to_model_input"]


def build_prior(name: str, **config) -> Prior:
    """A new prior of registered family ``name`` with ``config`` (the family's dataclass fields)."""
    return PRIORS.build(name, **config)


def prior_files(model: Prior) -> dict[str, bytes]:
    """A prior checkpoint's files (:func:`fisher.checkpoints.module_files`)."""
    return checkpoints.module_files(model, "prior")


def save_prior(model: Prior, directory) -> None:
    checkpoints.save_module(model, "prior", directory)


def prior_from_files(files: dict[str, bytes], where: str = "checkpoint", map_location="cpu") -> Prior:
    """Rebuild a prior from checkpoint files; never unpickles code (``weights_only=True``). Eval mode."""
    return checkpoints.module_from_files(files, "prior", where, map_location)


def prior_location(path) -> str:
    """The directory of a prior: ``builtin:<name>`` (:mod:`fisher.priors.builtin`) or the path itself."""
    from fisher.priors import builtin
    return builtin.location(path)


def load_prior(directory, map_location="cpu") -> Prior:
    """Load a prior saved by :func:`save_prior` (or an older ``model.json`` checkpoint), or a builtin one
    (``load_prior("builtin:mnist-pixelcnn")``)."""
    return checkpoints.load_module(prior_location(directory), "prior", map_location)


def to_model_input(images, device=None) -> torch.Tensor:
    """uint8 images (N, H, W, C) as stored in shards → long tensor (N, C, H, W)."""
    t = torch.as_tensor(images).permute(0, 3, 1, 2)
    return torch.empty(t.shape, dtype=torch.long).copy_(t).to(device)   # plain NCHW strides, also for C=1


from fisher.registry import load_plugins as _load_plugins  # noqa: E402

_load_plugins()
