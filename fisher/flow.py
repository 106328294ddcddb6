"""The multiscale RealNVP flow (Dinh et al. 2016), optionally conditioned: one network for the paper's
conditional RealNVP decoder (:mod:`fisher.decoders.realnvp`, appendix 7.2) and the unconditional RealNVP
whose latent is an embedding kind (:mod:`fisher.priors.realnvp`).

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
alike). The paper's defaults for 64 × 64 CelebA are 2 blocks of 32 features.

Conditioning (paper appendix 7.2; ``cond_dim`` > 0): a vector h is projected by a linear map to the
ResNet's channel dimension and added as a bias, broadcast over the image, to the input of its residual
blocks; one projection per coupling. With ``cond_dim = 0`` the flow is unconditional (``h`` is None).

Discrete data (RealNVP sec. 4.1): an integer image x ∈ {0, …, L-1}^D (L = levels) is dequantized,
y = (x + u) / L with u ∈ [0, 1)^D, and taken to the real line by the logit transform
v = logit(α + (1 - 2α) y), α = 0.05 (:func:`to_logit`); :func:`from_logit` maps back and rounds down to
the level, so u = ½ (the cell's centre) makes x → v → x exact. :func:`discrete_nll` is

    -log p(v | h) - Σ log |dv/dy| + D log L,

the negative log-density of y on the unit cube (in nats) plus the log-volume of one cell of the 1/L
grid: in expectation over u ~ U[0, 1)^D an upper bound on -log P(x | h) of the discrete image (Jensen).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from fisher.errors import FisherError

LOGIT_ALPHA = 0.05          # RealNVP sec. 4.1


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
        self.cond = nn.Linear(cond_dim, features) if cond_dim else None
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), _conv(features, features), nn.ReLU(),
                                                  _conv(features, features)) for _ in range(blocks))
        self.out = _conv(features, 2 * cout, zero=True)
        self.scale = nn.Parameter(torch.ones(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None):
        a = self.inp(x)
        if self.cond is not None:
            a = a + self.cond(h)[:, :, None, None]
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

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, reverse: bool = False):
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


def n_scales(h: int, w: int, scales: int, who: str = "realnvp") -> int:
    """Factoring scales: ``scales`` if given (each needs even sides), else while the sides are even and
    the squeezed side is at least 4."""
    n = 0
    while (n < scales if scales else (h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= 4)):
        if h % 2 or w % 2:
            raise FisherError(f"{who}: scales={scales} needs sides divisible by 2^{scales}; "
                              f"the image is {h}x{w} at scale {n}; pass a smaller --scales (0: as many as fit)")
        h, w, n = h // 2, w // 2, n + 1
    return n


class MultiscaleFlow(nn.Module):
    """f: v (B, C, H, W) → base variables, invertible, with ``scales`` factoring scales (module docstring;
    :func:`n_scales` gives the count an image size allows)."""

    def __init__(self, channels: int, scales: int, blocks: int = 2, features: int = 32, cond_dim: int = 0):
        super().__init__()
        self.scales = nn.ModuleList(Scale(channels * 2 ** k, k == scales, features, blocks, cond_dim)
                                    for k in range(scales + 1))

    def shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """The (C, H, W) of the factored-out parts of an h × w image, then of the last scale's output."""
        c, out = self.scales[0].check[0].net.inp.in_channels, []
        for _ in range(len(self.scales) - 1):
            h, w, c = h // 2, w // 2, 4 * c
            out.append((c - c // 2, h, w))
            c = c // 2
        return out + [(c, h, w)]

    def forward(self, v: torch.Tensor, h: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The base variables (one tensor per factored part, then the last scale's) and log|det ∂f/∂v|."""
        parts, logdet = [], v.new_zeros(v.shape[0])
        for scale in self.scales:
            v, ld = scale(v, h)
            logdet = logdet + ld
            if not scale.last:
                keep = v.shape[1] // 2
                parts.append(v[:, keep:])
                v = v[:, :keep]
        return parts + [v], logdet

    def inverse(self, parts: list[torch.Tensor], h: torch.Tensor | None = None) -> torch.Tensor:
        """f⁻¹: the base variables (as :meth:`forward` returns them) → v."""
        v = parts[-1]
        for k in range(len(self.scales) - 1, -1, -1):
            if not self.scales[k].last:
                v = torch.cat([v, parts[k]], 1)
            v = self.scales[k].inverse(v, h)
        return v

    def flatten(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The base variables as one vector per image (B, D), parts in order."""
        return torch.cat([p.flatten(1) for p in parts], 1)

    def unflatten(self, z: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
        """Inverse of :meth:`flatten` for h × w images."""
        shapes = self.shapes(h, w)
        sizes = [c * hh * ww for c, hh, ww in shapes]
        return [p.reshape(len(z), *s) for p, s in zip(z.split(sizes, dim=1), shapes)]


def to_logit(x: torch.Tensor, u: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v = logit(α + (1-2α)(x + u)/L) and Σ log|dv/dy| per image."""
    p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * (x.to(u.dtype) + u) / levels
    v = torch.log(p) - torch.log1p(-p)
    ld = (math.log(1 - 2 * LOGIT_ALPHA) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    return v, ld


def from_logit(v: torch.Tensor, levels: int) -> torch.Tensor:
    """v → the integer level ⌊L y⌋ in {0, …, L-1}."""
    y = (torch.sigmoid(v) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)
    return (y * levels).floor().clamp_(0, levels - 1).long()


def discrete_nll(flow: MultiscaleFlow, x: torch.Tensor, u: torch.Tensor, levels: int,
                 h: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(y | h) + D log L in nats per image for dequantization noise ``u`` (module docstring)."""
    v, ld_logit = to_logit(x, u, levels)
    parts, ld_flow = flow(v, h)
    log_base = sum((-0.5 * p.square() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) for p in parts)
    return -(log_base + ld_flow + ld_logit) + x[0].numel() * math.log(levels)
