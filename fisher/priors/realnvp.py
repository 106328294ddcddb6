"""Unconditional multiscale RealNVP (Dinh et al. 2016) as a model of the images, whose exact latent is an
embedding kind (``fisher embed --kind realnvp``): the seed paper's flow baseline beside Fisher scores.

The network is :class:`fisher.flow.MultiscaleFlow` without conditioning, the same code as the
paper's conditional RealNVP decoder (:mod:`fisher.decoders.realnvp`); the defaults are RealNVP's 64 × 64
CelebA sizes (2 residual blocks of 32 features per coupling network) with ``scales`` factoring scales
(default 3: 32 × 32 → 4 × 4; RealNVP's 64 × 64 model has 4).

Likelihood (RealNVP sec. 4.1, :func:`fisher.flow.discrete_nll`): ``log_prob`` is minus the dequantized
bound, -log p(y) - D log L with y = (x + u)/L: in expectation over u ~ U[0, 1)^D a lower bound on
log P(x) of the discrete image (``exact_likelihood = False``, ``bound = "dequantized"``). In training u is
drawn fresh; in eval mode it is seeded per image by the image's bytes, so test NLLs repeat. RealNVP's
paper reports 3.02 bits/dim on 64 × 64 8-bit CelebA; our 32 × 32 5-bit images have 3 bits less per
sub-pixel to code and no comparable number.

Latent (``encode``): z = f(v(x, u = ½)), every factored-out scale's variables and the last scale's,
concatenated (D = H·W·C numbers). With u = ½, the centre of x's dequantization cell, ``decode`` =
f⁻¹ followed by the logit transform's inverse and rounding down returns x exactly (up to float
rounding far inside the cell): reconstructions are perfect, so interpolation at α = 0 is a floor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fisher.flow import MultiscaleFlow, discrete_nll, from_logit, n_scales, to_logit
from fisher.noise import row_generators
from fisher.priors.base import Prior
from fisher.priors.registry import PRIORS


@dataclass
class RealNVPPriorConfig:
    """RealNVP's 64 × 64 CelebA coupling networks (2 blocks of 32 features); 3 scales for 32 × 32."""
    channels: int = field(default=3, metadata={"data": True, "help": "image channels (1 grey, 3 RGB)"})
    levels: int = field(default=32, metadata={"data": True, "help": "values per sub-pixel"})
    scales: int = field(default=3, metadata={"help": "realnvp: factoring scales; each halves the sides (3: 32x32 "
                                                     "down to 4x4)"})
    blocks: int = field(default=2, metadata={"help": "realnvp: residual blocks per coupling net (RealNVP: 2)"})
    features: int = field(default=32, metadata={"help": "realnvp: channels of each coupling net (RealNVP: 32)"})

    def __post_init__(self):
        if self.channels < 1 or self.levels < 2:
            raise ValueError(f"channels={self.channels}, levels={self.levels}: need channels >= 1, levels >= 2")
        if self.scales < 0 or self.blocks < 0 or self.features < 1:
            raise ValueError(f"scales={self.scales}, blocks={self.blocks}, features={self.features}: need "
                             "scales >= 0, blocks >= 0, features >= 1")


@PRIORS.register("realnvp", RealNVPPriorConfig)
class RealNVP(Prior):
    """The unconditional multiscale RealNVP (module docstring)."""
    exact_likelihood = False
    bound = "dequantized"

    def __init__(self, channels: int = 3, levels: int = 32, scales: int = 3, blocks: int = 2, features: int = 32):
        super().__init__(channels, levels)
        self.config = RealNVPPriorConfig(channels, levels, scales, blocks, features)
        self.flow = MultiscaleFlow(channels, scales, blocks, features)

    def _check(self, h: int, w: int) -> None:
        n_scales(h, w, self.config.scales, "prior 'realnvp'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(y) + D log L per image (the training loss), for fresh (train) or seeded (eval) noise u."""
        self._check(x.shape[2], x.shape[3])
        if self.training:
            u = torch.rand(x.shape, device=x.device)
        else:
            u = torch.stack([torch.rand(x.shape[1:], generator=g)
                             for g in row_generators(x.flatten(1).float(), 0, 1)]).to(x.device)
        return discrete_nll(self.flow, x, u, self.levels)

    def log_prob_from_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -out

    log_prob_from_logits = log_prob_from_output

    # ------------------------------------------------------------ the latent
    def latent_size(self, image_shape) -> int:
        h, w, c = (int(v) for v in image_shape)
        self._check(h, w)
        return h * w * c

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = f(v(x, u = ½)) (B, H·W·C)."""
        self._check(x.shape[2], x.shape[3])
        v, _ = to_logit(x, torch.full(x.shape, 0.5, device=x.device), self.levels)
        return self.flow.flatten(self.flow(v)[0])

    def decode(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x = ⌊L·y(f⁻¹(z))⌋: integer images of the shape of ``u`` (B, C, H, W), whose values f⁻¹ ignores."""
        return from_logit(self.flow.inverse(self.flow.unflatten(z, u.shape[2], u.shape[3])), self.levels)
