"""Conditional multiscale RealNVP decoder p(x | z) (paper sec. 5.2 and appendix 7.2; Dinh et al. 2016).

The flow is :class:`fisher.flow.MultiscaleFlow` (couplings, multiscale factoring, weight-normalized
ResNet coupling networks: see :mod:`fisher.flow`), conditioned as appendix 7.2: the standardized
embedding h = z is projected by a linear map to each coupling ResNet's channel dimension
(``features``) and added as a bias to the input of its residual blocks. The paper's defaults for
64 × 64 CelebA are 2 blocks of 32 features; they are the defaults at every size (32 × 32 has three
factoring scales down to 4 × 4, 64 × 64 four, 128 × 128 five).

Discrete data: uniform dequantization and the logit transform (:func:`fisher.flow.discrete_nll`);
the loss, in expectation over the dequantization noise an upper bound on -log P(x | z) of the
discrete image, so ``nll`` and bits/dim are of x itself. Test metrics use one dequantization draw
per image, seeded.

Decoding for interpolation and FID (``generates = "sample"``): ε ~ N(0, T² I) at temperature
``temperature`` (default 1), v = f⁻¹(ε; h), y back through the logit transform, x = ⌊L y⌋ on
{0, …, L-1}, scaled to [0, 1]. The noise of each image is seeded by ``sample_seed`` and the bytes of its
embedding row, so a run's strips and FID are reproducible and the same z always decodes to the same
image, whatever the batch it is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError
from fisher.flow import MultiscaleFlow, discrete_nll, from_logit, n_scales
from fisher.noise import row_generators


@dataclass
class RealNVPConfig:
    """Paper defaults (appendix 7.2; RealNVP's 64 × 64 CelebA model): 2 residual blocks of 32 features."""
    scales: int = field(default=0, metadata={"help": "realnvp decoder: factoring scales (0: down to 4x4)"})
    blocks: int = field(default=2, metadata={"help": "realnvp decoder: residual blocks per coupling net (paper: 2)"})
    features: int = field(default=32, metadata={"help": "realnvp decoder: channels of each coupling net (paper: 32)"})
    temperature: float = field(default=1.0, metadata={"help": "realnvp decoder: std of the base noise when "
                                                                   "decoding (default 1)"})
    sample_seed: int = field(default=0, metadata={"help": "realnvp decoder: seed of the per-image decoding noise"})

    def __post_init__(self):
        if self.scales < 0 or self.blocks < 0 or self.features < 1:
            raise ValueError(f"scales={self.scales}, blocks={self.blocks}, features={self.features}: need "
                             "scales >= 0, blocks >= 0, features >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0")


def _flow_under_net(module, state_dict, prefix, *_):
    """Decoders saved before the flow moved to :mod:`fisher.flow` (2026-12-07) keep its layers at
    ``scales.*``; they are ``net.scales.*`` now. Same tensors, so old checkpoints load unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix + "scales.")]:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


@DECODERS.register("realnvp", RealNVPConfig)
class RealNVPDecoder(Decoder):
    """The paper's conditional multiscale RealNVP (module docstring)."""
    generates = "sample"

    def __init__(self, z_dim: int, image_shape, levels: int, scales: int = 0, blocks: int = 2,
                 features: int = 32, temperature: float = 1.0, sample_seed: int = 0):
        super().__init__(z_dim, image_shape, levels)
        self.temperature, self.seed = float(temperature), int(sample_seed)
        h, w, c = image_shape
        self.net = MultiscaleFlow(c, n_scales(h, w, scales, "decoder 'realnvp'"), blocks, features, z_dim)
        self.shapes = self.net.shapes(h, w)     # (C, H, W) of the factored-out parts, then of the last scale
        self.register_load_state_dict_pre_hook(_flow_under_net)

    def flow(self, v: torch.Tensor, h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """v → the base variables and log|det ∂f/∂v| per image, given the standardized embedding ``h``."""
        return self.net(v, h)

    def inverse(self, parts: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return self.net.inverse(parts, h)

    def nll(self, z: torch.Tensor, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x | z) in nats per image (module docstring), for dequantization noise ``u``; by default
        drawn in train mode and, in eval mode, seeded per image by its embedding row (test metrics repeat)."""
        h = self.standardize(z)
        if u is None and self.training:
            u = torch.rand(x.shape, device=x.device)
        elif u is None:
            u = self._dequantization(z, x)
        return discrete_nll(self.net, x, u, self.levels, h)

    # ------------------------------------------------------------ the contract
    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.nll(z, x)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        raise FisherError("decoder 'realnvp' has no closed-form mean; it decodes by sampling (generate)")

    def _noise(self, shapes, gens, rand=torch.randn) -> list[torch.Tensor]:
        return [torch.stack([rand(*shape, generator=g) for g in gens]) for shape in shapes]

    def _dequantization(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """u ~ U[0, 1) of the shape of ``x``, seeded per image by its embedding row."""
        return self._noise([tuple(x.shape[1:])], row_generators(z, self.seed, 1), torch.rand)[0].to(x.device)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x | z) at ``temperature``: integer images (B, C, H, W). Without ``generator`` the noise of
        each image is seeded by its embedding row (module docstring)."""
        if generator is None:
            eps = [e.to(z.device) for e in self._noise(self.shapes, row_generators(z, self.seed, 0))]
        else:
            eps = [torch.randn(len(z), *s, generator=generator).to(z.device) for s in self.shapes]
        v = self.inverse([e * self.temperature for e in eps], self.standardize(z))
        return from_logit(v, self.levels)
