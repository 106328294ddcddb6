"""The contract every decoder z → x meets (paper sec. 4.2, appendix 7.2).

A decoder is built as ``cls(z_dim, image_shape, levels, **config)`` with ``image_shape = (H, W, C)``
(the shard layout) and integer images ``x`` (B, C, H, W) in [0, levels). It answers:

* ``loss(z, x)``: per-image training loss, Tensor[B]; for likelihood decoders -log p(x | z) in nats;
* ``mean(z)``: the expected image E[x̂ | z] on [0, 1], float (B, C, H, W), where the decoder has one;
* ``sample(z, generator)``: an integer image drawn from p(x | z);
* ``generate(z, generator)``: what interpolation strips, edits and FID decode to, on [0, 1]:
  ``mean(z)`` when ``generates == "mean"`` (the conv decoders), a sample scaled to [0, 1] when
  ``generates == "sample"`` (flows, GANs, autoregressive decoders);
* ``make_optimizer(lr)``: the optimizer ``train_step`` gets (Adam by default; ``default_lr`` is the
  learning rate when none is given: the paper's 1e-3, or the decoder's own);
* ``train_step(opt, z, x)``: one optimisation step, returns {"loss": float}; adversarial decoders
  (no likelihood: ``has_likelihood = False``) override it with their own step;
* ``reconstruction_metrics(z, x)``: batch sums for the test reconstruction error
  (:func:`fisher.decoders.summarize_metrics`).

Input standardization: the base class standardizes ``z`` per coordinate with the train split's
mean and standard deviation (buffers ``z_mean``, ``z_scale``, set by :meth:`fit_input` and saved
with the weights). Paper sec. 3.2: the Fisher kernel is approximated by dot products of
*standardized* Fisher scores; raw scores span orders of magnitude. The map is affine, so the
paper's interpolation (1-α)z₁ + αz₂ and attribute vectors are unchanged by it.

Likelihood decoders implement ``decode(z_standardized)`` returning the parameters of their head
(:mod:`fisher.likelihoods`: Bernoulli logits for binary data, categorical logits otherwise);
``forward(z)`` is ``decode`` of the standardized input.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fisher.errors import FisherError
from fisher.likelihoods import Likelihood, likelihood_for


class Decoder(nn.Module):
    """Base of every registered decoder; see the module docstring."""
    registered_name: str = "?"
    generates = "mean"          # what interpolation and FID use: "mean" or "sample"
    has_likelihood = True
    trainable = True            # False: nothing to optimise (the pixel baseline's identity decoder)
    default_lr = 1e-3           # Adam's learning rate when the trainer is given none (paper sec. 5.1/5.2)

    def __init__(self, z_dim: int, image_shape=None, levels: int | None = None, likelihood: Likelihood | None = None):
        super().__init__()
        self.z_dim = int(z_dim)
        self.register_buffer("z_mean", torch.zeros(z_dim))
        self.register_buffer("z_scale", torch.ones(z_dim))
        self.image_shape = tuple(int(v) for v in image_shape) if image_shape is not None else None
        self.levels = int(levels) if levels is not None else None
        self.likelihood = likelihood or (likelihood_for(self.levels) if self.levels else None)

    def bind(self, image_shape, levels: int) -> None:
        """Record the image format (for decoders whose constructor takes only z_dim)."""
        self.image_shape = tuple(int(v) for v in image_shape)
        if self.levels is None:
            self.levels = int(levels)
        if self.likelihood is None:
            self.likelihood = likelihood_for(self.levels)

    def checkpoint_args(self) -> dict:
        return {"z_dim": self.z_dim, "image_shape": list(self.image_shape), "levels": self.levels}

    @torch.no_grad()
    def fit_input(self, z: torch.Tensor) -> None:
        """Set the standardization from the train embeddings ``z`` (N, z_dim); constant coordinates keep scale 1."""
        z = z.to(self.z_mean.device, torch.float64)
        std = z.std(dim=0) if z.shape[0] > 1 else torch.zeros_like(z[0])
        self.z_mean.copy_(z.mean(dim=0))
        self.z_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.z_mean) / self.z_scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.standardize(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ the contract
    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.likelihood.nll(self(z), x).flatten(1).sum(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self(z))

    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.likelihood.sample(self(z), generator)

    def generate(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.generates == "mean":
            return self.mean(z)
        if self.generates == "sample":
            return self.sample(z, generator).float() / (self.levels - 1)
        raise FisherError(f"decoder {self.registered_name!r}: generates={self.generates!r}, "
                          "expected 'mean' or 'sample'")

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.default_lr if lr is None else lr)

    def train_step(self, opt: torch.optim.Optimizer, z: torch.Tensor, x: torch.Tensor) -> dict:
        self.train()
        opt.zero_grad(set_to_none=True)
        loss = self.loss(z, x).mean()
        if not torch.isfinite(loss):
            raise FisherError(f"the decoder's training loss became {float(loss)}; lower --lr and rerun "
                              "with a new --out")
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def reconstruction_metrics(self, z: torch.Tensor, x: torch.Tensor) -> dict:
        """Batch sums: ``nll_sum`` (nats; NaN without a likelihood), ``se_sum`` (squared error of ``generate``
        on [0, 1]), ``n_subpixels``, ``n_images``. A sampling decoder's ``loss`` in eval mode is its test NLL."""
        if self.has_likelihood and self.generates == "mean":      # one pass: the head gives the NLL and the mean
            out = self(z)
            nll, gen = self.likelihood.nll(out, x), self.likelihood.mean(out)
        else:
            nll = self.loss(z, x) if self.has_likelihood else torch.full((len(x),), float("nan"))
            gen = self.generate(z)
        se = (gen - x.to(gen.dtype) / (self.levels - 1)).square()
        return {"nll_sum": float(nll.double().sum()), "se_sum": float(se.double().sum()),
                "n_subpixels": x.numel(), "n_images": x.shape[0]}
