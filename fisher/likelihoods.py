"""Sub-pixel likelihood heads shared by priors and decoders.

A network ends in a convolution with ``channels · head.outputs`` output maps;
:meth:`Likelihood.view` turns that into the head's parameter layout, and the head
gives, per sub-pixel of integer images ``x`` (B, C, H, W) in [0, levels):

* ``log_prob(params, x)`` (B, C, H, W), in nats; ``nll`` its negative;
* ``mean(params)``: E[x̂] on [0, 1] (values k/(levels-1)), float (B, C, H, W);
* ``mode(params)`` and ``sample(params, generator)``: integer images.

Heads:

* :class:`Bernoulli` — binarized MNIST (paper sec. 5.1): one logit per sub-pixel,
  params (B, C, H, W). (A 2-way softmax, the appendix's "2 filters", is the same
  model with one redundant parameter.)
* :class:`Categorical` — 2^bits levels (paper: 5-bit CelebA, 32-way softmax per
  sub-pixel, van den Oord et al. 2016), params (B, C, levels, H, W).
* :class:`DiscretizedLogisticMixture` — PixelCNN++ (Salimans et al. 2017, sec. 2.1):
  a mixture of K logistics per sub-pixel on [-1, 1], discretized to ``levels`` bins,
  with the edge bins taking the tails (-∞ at 0, +∞ at levels-1), params
  (B, C, 3K, H, W) = mixture logits, means, log-scales. Dependencies between the
  colour channels of a pixel come from the network's channel masks, so each
  sub-pixel has its own mixture (PixelCNN++'s linear channel coefficients are a
  reparametrization the Pyramid prior may add).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fisher.errors import FisherError


class Likelihood:
    """Base of every head; see the module docstring."""
    outputs: int = 1          # output maps per image channel

    def __init__(self, levels: int):
        if levels < 2:
            raise FisherError(f"levels={levels}: a likelihood needs at least 2 values per sub-pixel")
        self.levels = int(levels)

    def view(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        """(B, C·outputs, H, W) network output → this head's parameter layout."""
        if self.outputs == 1:
            return out
        b, _, h, w = out.shape
        return out.view(b, channels, self.outputs, h, w)

    def check(self, params: torch.Tensor, x: torch.Tensor) -> None:
        shape = params.shape if self.outputs == 1 else params.shape[:2] + params.shape[3:]
        if (params.dim() != (4 if self.outputs == 1 else 5) or shape != x.shape
                or (self.outputs > 1 and params.shape[2] != self.outputs)):
            raise FisherError(f"decoder logits {tuple(params.shape)} do not match images {tuple(x.shape)} "
                              f"with {self.levels} levels")

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(params, x)

    def log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """log p(k) for every level k: (B, C, levels, H, W)."""
        raise NotImplementedError

    def values(self, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.levels, dtype=like.dtype, device=like.device) / (self.levels - 1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bckhw,k->bchw", self.log_probs(params).exp(), self.values(params))

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return self.log_probs(params).argmax(dim=2)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.log_probs(params).exp().movedim(2, -1)                     # (B, C, H, W, levels)
        flat = torch.multinomial(p.reshape(-1, self.levels), 1, generator=generator)
        return flat.view(p.shape[:-1])


class Bernoulli(Likelihood):
    """Binary sub-pixels: one logit each."""
    outputs = 1

    def __init__(self, levels: int = 2):
        if levels != 2:
            raise FisherError(f"Bernoulli likelihood: levels={levels}, needs 2")
        super().__init__(2)

    def log_prob(self, params, x):
        self.check(params, x)
        return -F.binary_cross_entropy_with_logits(params, x.to(params.dtype), reduction="none")

    def log_probs(self, params):
        return torch.stack([F.logsigmoid(-params), F.logsigmoid(params)], dim=2)

    def mean(self, params):
        return torch.sigmoid(params)

    def mode(self, params):
        return (params > 0).long()

    def sample(self, params, generator=None):
        return torch.bernoulli(torch.sigmoid(params), generator=generator).long()


class Categorical(Likelihood):
    """``levels``-way softmax per sub-pixel."""

    def __init__(self, levels: int):
        super().__init__(levels)
        self.outputs = self.levels

    def log_prob(self, params, x):
        self.check(params, x)
        return -F.cross_entropy(params.transpose(1, 2), x.long(), reduction="none")

    def log_probs(self, params):
        return torch.log_softmax(params, dim=2)

    def mode(self, params):
        return params.argmax(dim=2)


class DiscretizedLogisticMixture(Likelihood):
    """PixelCNN++'s likelihood (see the module docstring); ``components`` = K."""

    def __init__(self, levels: int, components: int = 10):
        super().__init__(levels)
        if components < 1:
            raise FisherError(f"components={components}: a mixture needs at least 1 component")
        self.components = int(components)
        self.outputs = 3 * self.components

    def _split(self, params):
        k = self.components
        logit_w, mu, log_s = params[:, :, :k], params[:, :, k:2 * k], params[:, :, 2 * k:]
        return torch.log_softmax(logit_w, dim=2), mu, log_s.clamp(min=-7.0)

    def _bin_log_prob(self, log_w, mu, log_s, x):
        """log p(x) for integer ``x`` broadcast against the (B, C, K, H, W) mixture parameters."""
        half = 1.0 / (self.levels - 1)
        centre = x.to(mu.dtype) * (2 * half) - 1.0                 # the bin's centre on [-1, 1]
        inv_s = torch.exp(-log_s)
        plus, minus = inv_s * (centre - mu + half), inv_s * (centre - mu - half)
        log_cdf_plus = plus - F.softplus(plus)                     # log σ(plus): the k = 0 bin takes (-∞, ...]
        log_sf_minus = -F.softplus(minus)                          # log(1 - σ(minus)): the top bin takes [..., ∞)
        # log(σ(plus) - σ(minus)), stable: σ(b) - σ(a) = σ(b)(1 - σ(a)) (1 - e^{a-b})
        log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
        top = x >= self.levels - 1
        bottom = x <= 0
        logp = torch.where(bottom, log_cdf_plus, torch.where(top, log_sf_minus, log_mid))
        return torch.logsumexp(log_w + logp, dim=2)

    def check(self, params, x):
        if params.dim() != 5 or params.shape[2] != self.outputs or params.shape[:2] + params.shape[3:] != x.shape:
            raise FisherError(f"logistic-mixture parameters {tuple(params.shape)} do not match images "
                              f"{tuple(x.shape)} with {self.components} components")

    def log_prob(self, params, x):
        self.check(params, x)
        log_w, mu, log_s = self._split(params)
        return self._bin_log_prob(log_w, mu, log_s, x.long().unsqueeze(2))

    def log_probs(self, params):
        log_w, mu, log_s = self._split(params)
        return torch.stack([self._bin_log_prob(log_w, mu, log_s, torch.full_like(mu[:, :, :1], k, dtype=torch.long))
                            for k in range(self.levels)], dim=2)


HEADS = {"bernoulli": Bernoulli, "categorical": Categorical, "logistic_mixture": DiscretizedLogisticMixture}


def likelihood_for(levels: int, kind: str = "auto", **options) -> Likelihood:
    """The head for ``levels`` values per sub-pixel: ``auto`` is Bernoulli for 2 levels, else Categorical."""
    if kind == "auto":
        kind = "bernoulli" if levels == 2 else "categorical"
    if kind not in HEADS:
        raise FisherError(f"unknown likelihood {kind!r}; have {', '.join(HEADS)}")
    return HEADS[kind](levels, **options)


def bits_per_dim(nats_per_image: float, dims: int) -> float:
    return nats_per_image / (dims * math.log(2))
