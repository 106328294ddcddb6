"""Conditional PixelCNN decoder p(x | z) (paper sec. 5.2 and appendix 7.2; van den Oord et al. 2016).

The network is the Gated PixelCNN of the prior (:class:`fisher.priors.gated.GatedPixelCNN`, paper
appendix 7.1.2: 5 layers, 120 filters, kernel 7) with conditioning vector h = z, the standardized
embedding: V·h is added inside every gate of both stacks (van den Oord et al. eq. 4). It is trained by
maximum likelihood; ``loss`` is the exact -log p(x | z) in nats per image, each sub-pixel's term of the
likelihood head (Bernoulli for binary data, categorical per sub-pixel otherwise) taken with the true
image as the input (teacher forcing). There is no closed-form mean: interpolation strips and FID
decode by sampling (``generates = "sample"``).

Sampling draws one uniform u per sub-pixel up front and decodes them by the Gated PixelCNN's cached,
exact sampler (:meth:`fisher.priors.gated.GatedPixelCNN.sample_with`; its algorithm and cost are
explained in :mod:`fisher.priors.gated`). Without a generator each image draws its uniforms from its own
generator, seeded by ``sample_seed`` and its embedding row, so the same z decodes to the same image
whatever the batch it is in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError
from fisher.noise import row_generators


@dataclass
class PixelCNNDecoderConfig:
    """Paper defaults (appendix 7.1.2, the Gated PixelCNN's sizes): 5 layers, 120 filters, kernel 7."""
    layers: int = field(default=5, metadata={"help": "pixelcnn decoder: gated layers (paper: 5)"})
    filters: int = field(default=120, metadata={"help": "pixelcnn decoder: feature maps per stack (paper: 120)"})
    kernel: int = field(default=7, metadata={"help": "pixelcnn decoder: kernel size, odd (paper: 7)"})
    sample_seed: int = field(default=0, metadata={"help": "pixelcnn decoder: seed of the per-image sampling noise"})

    def __post_init__(self):
        if self.layers < 1 or self.filters < 1 or self.kernel < 3 or self.kernel % 2 == 0:
            raise ValueError(f"layers={self.layers}, filters={self.filters}, kernel={self.kernel}: need "
                             "layers >= 1, filters >= 1 and an odd kernel >= 3")


@DECODERS.register("pixelcnn", PixelCNNDecoderConfig)
class PixelCNNDecoder(Decoder):
    """The paper's conditional Gated PixelCNN decoder (module docstring)."""
    generates = "sample"
    has_likelihood = True

    def __init__(self, z_dim: int, image_shape, levels: int, layers: int = 5, filters: int = 120, kernel: int = 7,
                 sample_seed: int = 0):
        super().__init__(z_dim, image_shape, levels)
        # imported here: fisher.priors loads $FISHER_PLUGINS on import, and a plugin may import
        # fisher.decoders, which must have finished initializing by then
        from fisher.priors.gated import GatedPixelCNN
        self.seed = int(sample_seed)
        self.net = GatedPixelCNN(channels=image_shape[2], levels=levels, n_layers=layers, filters=filters,
                                 kernel_size=kernel, condition_dim=z_dim)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The head's parameters for every sub-pixel of ``x`` given the sub-pixels before it and z."""
        return self.net(x, self.standardize(z))

    # ------------------------------------------------------------ the contract
    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.likelihood.nll(self(z, x), x).flatten(1).sum(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        raise FisherError("decoder 'pixelcnn' has no closed-form mean; it decodes by sampling (generate)")

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x | z): integer images (B, C, H, W). Without ``generator`` the uniforms of each image are
        seeded by its embedding row (module docstring)."""
        h, w, c = self.image_shape
        if generator is None:
            u = torch.stack([torch.rand(c, h, w, generator=g) for g in row_generators(z, self.seed, 0)])
        else:
            u = torch.rand(len(z), c, h, w, generator=generator)
        return self.sample_with(z, u.to(z.device))

    @torch.no_grad()
    def sample_with(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The image whose sub-pixels are the inverse CDF of uniforms ``u`` (B, C, H, W), by the Gated
        PixelCNN's cached sampler."""
        return self.net.sample_with(u, self.standardize(z))
