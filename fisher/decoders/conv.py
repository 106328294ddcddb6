"""The paper's conv decoders (appendix 7.2.1 for MNIST, 7.2.2 for CelebA).

Both end in a convolution with ``channels · head.outputs`` maps, viewed as the likelihood head's
parameters (:mod:`fisher.likelihoods`): one Bernoulli logit per pixel for binary data (the
appendix's "2 filters" last layer is a 2-way softmax; logits (a, b) give p(x=1) = sigmoid(b - a),
so one logit is the same model with no redundant parameter), ``levels`` categorical logits per
sub-pixel otherwise (5-bit CelebA: 32). Interpolation and FID use the expected image
(``generates = "mean"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError


@dataclass
class ConvDecoderConfig:
    """Appendix 7.2.1: the Linear layer's 1024 outputs are 64 maps of 4 × 4 at 28 × 28."""
    base_channels: int = field(default=64, metadata={"help": "conv decoder: maps of the first 4x4 stage (paper: 64)"})

    def __post_init__(self):
        if self.base_channels < 1:
            raise ValueError(f"base_channels={self.base_channels} must be >= 1")


@dataclass
class CelebAConvDecoderConfig:
    """Appendix 7.2.2: 256 channels in every stage."""
    channels: int = field(default=256, metadata={"help": "celeba_conv decoder: channels per stage (paper: 256)"})

    def __post_init__(self):
        if self.channels < 1:
            raise ValueError(f"channels={self.channels} must be >= 1")


class ResBlock(nn.Module):
    """Appendix 7.2.1: [Conv1x1, BN, ReLU, Conv3x3 pad 1, BN, ReLU, Conv1x1, BN, ReLU] + shortcut, ReLU.

    The convolutions have no bias (the BatchNorm that follows supplies it).
    """

    def __init__(self, channels: int):
        super().__init__()
        layers = []
        for k in (1, 3, 1):
            layers += [nn.Conv2d(channels, channels, k, padding=k // 2, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _halvings(size: int, n: int) -> list[int]:
    """Sizes [s_0, ..., s_n = size] with s_{i-1} = ceil(s_i / 2)."""
    sizes = [size]
    for _ in range(n):
        sizes.insert(0, -(-sizes[0] // 2))
    return sizes


@DECODERS.register("conv", ConvDecoderConfig)
class ConvDecoder(Decoder):
    """The paper's MNIST decoder (appendix 7.2.1; sec. 5.1 "a dense layer followed by
    3 transposed convolutional layers that upscale the image to 28 × 28"):

    Linear(z_dim → 1024), ReLU, ConvT(128, k5, s2), ReLU, ResBlock(128),
    ConvT(32, k5, s2), BN, ReLU, ConvT(out, k5, s2).

    The appendix's shapes do not reach 28 × 28 as written, so the minimal fix:

    * the 1024-vector is reshaped to (64, h0, w0) with h0 = ceil(H/8),
      w0 = ceil(W/8): 64 × 4 × 4 = 1024 for 28 × 28 and 32 × 32 (exactly the
      paper's width); for other sizes the Linear layer has 64·h0·w0 outputs
      (``base_channels`` · h0 · w0; 4096 for 64 × 64);
    * each ConvT has padding 2, giving 2n - 1 + output_padding; output_padding
      (0 or 1, per axis) is chosen so the sizes go ceil(H/4) → ceil(H/2) → H:
      28: 4 → 7 → 14 → 28 (output_padding 0, 1, 1); 32: 4 → 8 → 16 → 32
      (1, 1, 1); 64: 8 → 16 → 32 → 64. Any H, W ≥ 1 lands exactly; no crop.

    ``out`` is C Bernoulli logits for binary data, C·levels categorical logits otherwise.
    """

    def __init__(self, z_dim: int, image_shape, levels: int, base_channels: int = 64):
        super().__init__(z_dim, image_shape, levels)
        h, w, c = image_shape
        self.channels = c
        hs, ws = _halvings(h, 3), _halvings(w, 3)
        self.start = (base_channels, hs[0], ws[0])
        op = [(hs[i + 1] - (2 * hs[i] - 1), ws[i + 1] - (2 * ws[i] - 1)) for i in range(3)]
        up = lambda cin, cout, i: nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=op[i])
        self.linear = nn.Linear(z_dim, base_channels * hs[0] * ws[0])
        self.net = nn.Sequential(
            up(base_channels, 128, 0), nn.ReLU(), ResBlock(128),
            up(128, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
            up(32, c * self.likelihood.outputs, 2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.linear(z)).view(z.shape[0], *self.start)
        return self.likelihood.view(self.net(h), self.channels)


@DECODERS.register("celeba_conv", CelebAConvDecoderConfig)
class CelebAConvDecoder(Decoder):
    """The paper's CelebA conv decoder (appendix 7.2.2):

    z as (z_dim, 1, 1) → ConvT(256, k4) [4 × 4] → n × [ResBlock(256), Upsample 2x]
    → BN, ReLU → Conv1x1(out).

    The appendix lists 4 stages (4 → 64); here n = log2(H/4) so the output is
    H × H: 3 stages for 32 × 32, 4 for 64 × 64, 5 for the paper's 128 × 128.
    Images must be square with H/4 a power of two. Upsampling is nearest
    neighbour. ``out`` is C·levels logits (the appendix's "32 filters" is the
    32 levels of one 5-bit channel; RGB gives 3·levels, viewed as (B, 3, levels, H, W)),
    or C Bernoulli logits for binary data.
    """

    def __init__(self, z_dim: int, image_shape, levels: int, channels: int = 256):
        super().__init__(z_dim, image_shape, levels)
        h, w, c = image_shape
        n_up = math.log2(h / 4) if h >= 4 else -1
        if h != w or n_up != int(n_up) or n_up < 0:
            raise FisherError(f"decoder 'celeba_conv': image size {h}x{w} is not supported; "
                              "it needs square images of side 4·2^k (32, 64, 128); use decoder 'conv'")
        self.channels = c
        layers = [nn.ConvTranspose2d(z_dim, channels, 4)]
        for _ in range(int(n_up)):
            layers += [ResBlock(channels), nn.Upsample(scale_factor=2)]
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, c * self.likelihood.outputs, 1)]
        self.net = nn.Sequential(*layers)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.view(self.net(z[:, :, None, None]), self.channels)
