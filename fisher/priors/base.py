"""The contract every prior p_θ(x) meets (paper sec. 3.1: an autoregressive model with exact likelihood).

A prior is an ``nn.Module`` built from a config dataclass (``self.config``, defaults from the paper)
whose fields include ``channels`` and ``levels`` (taken from the data). It answers:

* ``forward(x)``: the parameters of its likelihood head (:mod:`fisher.likelihoods`) for integer
  images ``x`` (B, C, H, W) in [0, levels), each sub-pixel conditioned only on the sub-pixels
  before it in raster and R→G→B order;
* ``log_prob(x)``: exact log p_θ(x) in nats, Tensor[B] (the sum of the head's per-sub-pixel terms);
* ``hidden(x)``: the activations the paper's baseline embedding uses ("second-to-last layer"),
  any shape (B, ...), flattened by :func:`fisher.scores.activations`.

Latent-variable models of the seed papers (PixelVAE, :mod:`fisher.priors.pixelvae`; RealNVP,
:mod:`fisher.priors.realnvp`) are registered here too, so ``fisher train-prior`` trains them with the
same Ray Train loop, checkpoints and resume. Their ``log_prob`` is a bound (``exact_likelihood = False``;
``bound`` names it: the ELBO, RealNVP's dequantized bound), so they have no Fisher score; their
embedding is their latent:

* ``latent_size(image_shape)``, ``encode(x)`` → (B, d): the latent an embedding kind of the same name stores;
* ``decode(z, u)`` → integer images of the shape of the uniforms ``u`` (B, C, H, W) (an autoregressive
  decoder samples by inverse CDF from them; a flow's f⁻¹ ignores their values);
* optionally ``decoder_nll(z, x)``: -log p(x | z) per image, and ``importance_log_prob(x, samples)``.

Masks are applied in the forward pass (``conv(x, w * mask)``), never by editing weights in place,
and a parameter entry a mask pins has a ``mask`` buffer of the weight's shape on its module, so
:mod:`fisher.scores` leaves it out of the Fisher score.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fisher.likelihoods import Likelihood, likelihood_for


class Prior(nn.Module):
    """Base of every registered prior; see the module docstring."""
    registered_name: str = "?"
    exact_likelihood = True     # False: log_prob is a bound (named by ``bound``); no Fisher score
    bound: str | None = None

    def __init__(self, channels: int, levels: int, likelihood: Likelihood | None = None):
        super().__init__()
        self.channels, self.levels = int(channels), int(levels)
        self.likelihood = likelihood or likelihood_for(self.levels)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Integer sub-pixel values in [0, levels) → floats in [-1, 1]."""
        return x.float() * (2.0 / (self.levels - 1)) - 1.0

    def log_prob_from_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) from ``forward``'s output (lets torch.func and DDP call the network themselves)."""
        return self.likelihood.log_prob(out, x).flatten(1).sum(1)

    log_prob_from_logits = log_prob_from_output

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p_θ(x) in nats, one value per image."""
        return self.log_prob_from_output(self(x), x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no baseline activations")

    @torch.no_grad()
    def hidden_size(self, image_shape) -> int:
        """Length of the flattened :meth:`hidden` activations for images (H, W, C)."""
        h, w, c = (int(v) for v in image_shape)
        was = self.training
        out = self.eval().hidden(torch.zeros(1, c, h, w, dtype=torch.long, device=_device(self)))
        self.train(was)
        return int(out[0].numel())


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
