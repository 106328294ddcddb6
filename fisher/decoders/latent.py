"""The decoder of a latent-variable model's own latent: the seed papers' baselines (``fisher embed --kind
pixelvae|realnvp``) decoded by the model that made them.

``fisher train-decoder --decoder latent`` copies the model the embeddings were made with (the embed
manifest's ``--prior``, a ``fisher train-prior --prior pixelvae|realnvp`` checkpoint) into the decoder
checkpoint, with no optimisation step (``trainable = False``, like the pixel baseline's identity): its
architecture is the ``model``/``model_config`` fields, its weights the model's. No input standardization:
the latent is the model's own coordinates, and (1 - α) z₁ + α z₂ is interpolated in them.

Decoding (``generates = "sample"``), by the model's ``decode(z, u)``:

* PixelVAE (Gulrajani et al. 2016): x ~ p(x | z), sampled by its autoregressive decoder (the Gated
  PixelCNN's cached sampler) from uniforms seeded by ``sample_seed`` and the embedding row, so the same z
  decodes to the same image in any batch; its ``loss`` is the exact -log p(x | z), so the report has a
  reconstruction NLL;
* RealNVP (Dinh et al. 2016): f⁻¹(z), exact and deterministic; embeddings of real images decode to
  the images themselves (the α = 0 row is a floor), and there is no likelihood of x given z (a point mass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError
from fisher.noise import row_generators


@dataclass
class LatentDecoderConfig:
    """The model is filled in by ``fisher train-decoder`` from the embeddings' prior, not given as options."""
    model: str = field(default="", metadata={"data": True, "help": "the latent model's prior registry name"})
    model_config: dict = field(default_factory=dict, metadata={"data": True, "help": "the latent model's config"})
    sample_seed: int = field(default=0, metadata={"help": "latent decoder: seed of the per-image sampling noise "
                                                          "(pixelvae)"})


@DECODERS.register("latent", LatentDecoderConfig)
class LatentDecoder(Decoder):
    """A latent-variable model's decoder (module docstring)."""
    generates = "sample"
    trainable = False
    uses_embedding_model = True     # train-decoder builds it from the embeddings' --prior

    def __init__(self, z_dim: int, image_shape, levels: int, model: str = "", model_config: dict | None = None,
                 sample_seed: int = 0):
        super().__init__(z_dim, image_shape, levels)
        if not model:
            raise FisherError("decoder 'latent': decodes `fisher embed --kind pixelvae|realnvp` embeddings with "
                              "the model that made them; `fisher train-decoder --decoder latent` takes it from "
                              "the embeddings' --prior")
        from fisher.priors import PRIORS       # here: fisher.priors loads plugins, which may import fisher.decoders
        self.seed = int(sample_seed)
        self.model = PRIORS.build(model, **(model_config or {}))
        if not hasattr(self.model, "encode"):
            raise FisherError(f"decoder 'latent': prior {model!r} has no latent (pixelvae and realnvp have); "
                              "decode its embeddings with a trained decoder (--decoder conv, ...)")
        want = self.model.latent_size(self.image_shape)
        if z_dim != want:
            raise FisherError(f"decoder 'latent': the {model} model's latent has {want} numbers for "
                              f"{'x'.join(map(str, self.image_shape))} images, the embeddings {z_dim}; pass the "
                              "untransformed column z of its `fisher embed --kind` directory")
        self.has_likelihood = hasattr(self.model, "decoder_nll")

    def fit_input(self, z: torch.Tensor) -> None:
        """No standardization: the latent is the model's own coordinates."""

    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.has_likelihood:
            raise FisherError(f"decoder 'latent': the {self.model.registered_name} model decodes deterministically; "
                              "it has no likelihood of x given z")
        return self.model.decoder_nll(z, x)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        raise FisherError("decoder 'latent' has no closed-form mean; it decodes by sampling (generate)")

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The model's ``decode(z, u)``: u seeded per embedding row, or drawn from ``generator``."""
        h, w, c = self.image_shape
        if generator is None:
            u = torch.stack([torch.rand(c, h, w, generator=g) for g in row_generators(z, self.seed, 0)])
        else:
            u = torch.rand(len(z), c, h, w, generator=generator)
        return self.model.decode(z, u.to(z.device))

    def train_step(self, opt, z, x) -> dict:
        raise FisherError("decoder 'latent' has nothing to train; it is the latent model's own decoder")
