"""Conditional multiscale RealNVP decoder p(x | z) (paper sec. 5.2 and appendix 7.2; Dinh et al. 2016).

The flow (RealNVP sec. 3): affine couplings y_b = x_b, y_t = x_t ⊙ exp(s(x_b, h)) + t(x_b, h), whose
log-determinant is Σ s; s = scale ⊙ tanh(·) with a learned per-channel scale. Multiscale (sec. 3.6): at
each scale, three couplings with alternating checkerboard masks, a squeeze (each 2 × 2 × C patch becomes
1 × 1 × 4C), three couplings with alternating channel-wise masks, then half of the channels are
factored out (sent straight to the Gaussian base); the last scale has four checkerboard couplings.
Scales repeat while both sides are even and the squeezed side is at least 4 (32 × 32 → 16 → 8 → 4
has three factoring scales and the last at 4 × 4; 64 × 64 has four; 128 × 128 five; 28 × 28 stops
at 7 × 7), or ``scales`` of them when given.

Each s, t network is a ResNet (RealNVP sec. 4.1): a 3 × 3 convolution to ``features`` channels,
``blocks`` residual blocks (ReLU, 3 × 3 conv, ReLU, 3 × 3 conv, added), ReLU and a 3 × 3
convolution to 2 × the transformed channels, zero-initialized so each coupling starts as the
identity. Every convolution is weight-normalized (the paper's alternative to batch norm, used
here throughout: no batch statistics, so a flow is exactly invertible in train and eval mode
alike). The paper's defaults for 64 × 64 CelebA are 2 blocks of 32 features; they are the
defaults at every size.

Conditioning (appendix 7.2): the standardized embedding h = z is projected by a linear map to the
ResNet's channel dimension (``features``) and added as a bias, broadcast over the image, to the
input of its residual blocks; one projection per coupling.

Discrete data (RealNVP sec. 4.1): an integer image x ∈ {0, …, L-1}^D (L = levels, 32 for 5-bit
CelebA) is dequantized, y = (x + u) / L with u ~ U[0, 1)^D, and taken to the real line by the logit
transform v = logit(α + (1 - 2α) y), α = 0.05. The loss is

    -log p(v | h) - Σ log |dv/dy| + D log L,

the negative log-density of y on the unit cube (in nats) plus the log-volume of one cell of the
1/L grid: in expectation over u an upper bound on -log P(x | h) of the discrete image (Jensen), so
``nll`` and bits/dim are of x itself. Test metrics use one dequantization draw per image, seeded.

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
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from fisher.decoders.base import Decoder, row_generators
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError

LOGIT_ALPHA = 0.05          # RealNVP sec. 4.1


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


def _conv(cin: int, cout: int, zero: bool = False) -> nn.Module:
    """A weight-normalized 3 × 3 convolution; ``zero``: its output starts at 0 (g = 0 and bias 0; the
    direction v stays random, as w = g·v/‖v‖ needs)."""
    conv = weight_norm(nn.Conv2d(cin, cout, 3, padding=1))
    if zero:
        with torch.no_grad():
            conv.parametrizations.weight.original0.zero_()
            conv.bias.zero_()
    return conv


class CouplingNet(nn.Module):
    """s, t = CouplingNet(x_masked, h): the ResNet of one coupling, conditioned by a bias from h."""

    def __init__(self, cin: int, cout: int, features: int, blocks: int, cond_dim: int):
        super().__init__()
        self.inp = _conv(cin, features)
        self.cond = nn.Linear(cond_dim, features)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), _conv(features, features), nn.ReLU(),
                                                  _conv(features, features)) for _ in range(blocks))
        self.out = _conv(features, 2 * cout, zero=True)
        self.scale = nn.Parameter(torch.ones(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, h: torch.Tensor):
        a = self.inp(x) + self.cond(h)[:, :, None, None]
        for block in self.blocks:
            a = a + block(a)
        s, t = self.out(F.relu(a)).chunk(2, dim=1)
        return self.scale * torch.tanh(s), t


class Coupling(nn.Module):
    """One affine coupling. ``kind`` "checkerboard": the pixels with (i + j + parity) even condition the
    others; "channel": the first (parity 0) or second half of the channels conditions the other half."""

    def __init__(self, kind: str, parity: int, channels: int, features: int, blocks: int, cond_dim: int):
        super().__init__()
        self.kind, self.parity = kind, parity
        half = channels // 2
        cin, cout = (channels, channels) if kind == "checkerboard" else (half, channels - half)
        self.net = CouplingNet(cin, cout, features, blocks, cond_dim)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        i = torch.arange(x.shape[2], device=x.device)[:, None]
        j = torch.arange(x.shape[3], device=x.device)[None, :]
        return ((i + j + self.parity) % 2 == 0).to(x.dtype)[None, None]

    def forward(self, x: torch.Tensor, h: torch.Tensor, reverse: bool = False):
        """(y, log|det ∂y/∂x| per image); with ``reverse`` the inverse map (and the log-det of the inverse)."""
        if self.kind == "checkerboard":
            b = self._mask(x)
            s, t = self.net(x * b, h)
            s, t = s * (1 - b), t * (1 - b)
            y = x * torch.exp(-s) - t * torch.exp(-s) if reverse else x * torch.exp(s) + t
            y = b * x + (1 - b) * y
            ld = s.flatten(1).sum(1)
            return y, (-ld if reverse else ld)
        half = x.shape[1] // 2
        keep, change = (x[:, :half], x[:, half:]) if self.parity == 0 else (x[:, x.shape[1] - half:],
                                                                            x[:, :x.shape[1] - half])
        s, t = self.net(keep, h)
        y = (change - t) * torch.exp(-s) if reverse else change * torch.exp(s) + t
        out = torch.cat([keep, y], 1) if self.parity == 0 else torch.cat([y, keep], 1)
        ld = s.flatten(1).sum(1)
        return out, (-ld if reverse else ld)


class Scale(nn.Module):
    """One scale: checkerboard couplings, then (unless last) squeeze and channel-wise couplings."""

    def __init__(self, channels: int, last: bool, features: int, blocks: int, cond_dim: int):
        super().__init__()
        self.last = last
        n_check = 4 if last else 3
        self.check = nn.ModuleList(Coupling("checkerboard", k % 2, channels, features, blocks, cond_dim)
                                   for k in range(n_check))
        self.chan = nn.ModuleList() if last else nn.ModuleList(
            Coupling("channel", k % 2, 4 * channels, features, blocks, cond_dim) for k in range(3))

    def forward(self, x, h):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.check:
            x, ld = layer(x, h)
            logdet = logdet + ld
        if not self.last:
            x = F.pixel_unshuffle(x, 2)
            for layer in self.chan:
                x, ld = layer(x, h)
                logdet = logdet + ld
        return x, logdet

    def inverse(self, y, h):
        if not self.last:
            for layer in reversed(self.chan):
                y, _ = layer(y, h, reverse=True)
            y = F.pixel_shuffle(y, 2)
        for layer in reversed(self.check):
            y, _ = layer(y, h, reverse=True)
        return y


def _n_scales(h: int, w: int, scales: int) -> int:
    """Factoring scales: ``scales`` if given (each needs even sides), else while the sides are even and
    the squeezed side is at least 4."""
    n = 0
    while (n < scales if scales else (h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= 4)):
        if h % 2 or w % 2:
            raise FisherError(f"decoder 'realnvp': scales={scales} needs sides divisible by 2^{scales}; "
                              f"the image is {h}x{w} at scale {n}; pass a smaller --scales (0: as many as fit)")
        h, w, n = h // 2, w // 2, n + 1
    return n


@DECODERS.register("realnvp", RealNVPConfig)
class RealNVPDecoder(Decoder):
    """The paper's conditional multiscale RealNVP (module docstring)."""
    generates = "sample"

    def __init__(self, z_dim: int, image_shape, levels: int, scales: int = 0, blocks: int = 2,
                 features: int = 32, temperature: float = 1.0, sample_seed: int = 0):
        super().__init__(z_dim, image_shape, levels)
        h, w, c = image_shape
        self.temperature, self.seed = float(temperature), int(sample_seed)
        n = _n_scales(h, w, scales)
        self.scales = nn.ModuleList()
        self.shapes = []                  # shapes (C, H, W) of the factored-out parts, then of the last scale
        for k in range(n + 1):
            last = k == n
            self.scales.append(Scale(c, last, features, blocks, z_dim))
            if not last:
                h, w, c = h // 2, w // 2, 4 * c
                self.shapes.append((c - c // 2, h, w))
                c = c // 2
        self.shapes.append((c, h, w))

    # ------------------------------------------------------------ the flow
    def flow(self, v: torch.Tensor, h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """v (B, C, H, W) → the base variables (one tensor per factored part, then the last scale's) and
        log|det ∂f/∂v| per image. ``h`` is the standardized embedding."""
        parts, logdet = [], v.new_zeros(v.shape[0])
        for scale in self.scales:
            v, ld = scale(v, h)
            logdet = logdet + ld
            if not scale.last:
                keep = v.shape[1] // 2
                parts.append(v[:, keep:])
                v = v[:, :keep]
        return parts + [v], logdet

    def inverse(self, parts: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """f⁻¹: the base variables (as :meth:`flow` returns them) → v."""
        v = parts[-1]
        for k in range(len(self.scales) - 1, -1, -1):
            if not self.scales[k].last:
                v = torch.cat([v, parts[k]], 1)
            v = self.scales[k].inverse(v, h)
        return v

    # ------------------------------------------------------------ discrete data ↔ the real line
    def _to_logit(self, x: torch.Tensor, u: torch.Tensor):
        """v = logit(α + (1-2α)(x + u)/L) and Σ log|dv/dy| per image."""
        p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * (x.to(u.dtype) + u) / self.levels
        v = torch.log(p) - torch.log1p(-p)
        ld = (math.log(1 - 2 * LOGIT_ALPHA) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return v, ld

    def _from_logit(self, v: torch.Tensor) -> torch.Tensor:
        y = (torch.sigmoid(v) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)
        return (y * self.levels).floor().clamp_(0, self.levels - 1).long()

    def nll(self, z: torch.Tensor, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x | z) in nats per image (module docstring), for dequantization noise ``u``; by default
        drawn in train mode and, in eval mode, seeded per image by its embedding row (test metrics repeat)."""
        h = self.standardize(z)
        if u is None and self.training:
            u = torch.rand(x.shape, device=x.device)
        elif u is None:
            u = self._dequantization(z, x)
        v, ld_logit = self._to_logit(x, u)
        parts, ld_flow = self.flow(v, h)
        log_base = sum((-0.5 * p.square() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) for p in parts)
        return -(log_base + ld_flow + ld_logit) + x[0].numel() * math.log(self.levels)

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
        return self._from_logit(v)
