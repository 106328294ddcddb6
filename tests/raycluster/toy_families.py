"""A toy prior and a toy decoder defined outside the package, one class and one registration each,
loaded as a plugin (``FISHER_PLUGINS=toy_families``) by tests/raycluster/test_toy_family.py.

The prior is a one-layer PixelCNN with a learned logit temperature: a parameter outside any
convolution, so ``fisher_scores`` takes its generic (torch.func) path for it.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.decoders import Decoder, register_decoder
from fisher.priors import PRIORS, Prior
from fisher.priors.layers import MaskedConv2d


@dataclass
class ToyPriorConfig:
    channels: int = field(default=1, metadata={"data": True})
    levels: int = field(default=2, metadata={"data": True})
    width: int = field(default=4, metadata={"help": "toy prior: hidden maps"})


@PRIORS.register("toy", ToyPriorConfig)
class ToyPrior(Prior):
    def __init__(self, channels=1, levels=2, width=4):
        super().__init__(channels, levels)
        self.config = ToyPriorConfig(channels, levels, width)
        self.first = MaskedConv2d(channels, width, 3, "A", channels)
        self.out = MaskedConv2d(width, channels * self.likelihood.outputs, 1, "B", channels)
        self.temperature = nn.Parameter(torch.ones(()))

    def hidden(self, x):
        return F.relu(self.first(self.scale(x)))

    def forward(self, x):
        return self.likelihood.view(self.out(self.hidden(x)) * self.temperature, self.channels)


@register_decoder("toy_linear")
class ToyLinearDecoder(Decoder):
    def __init__(self, z_dim, image_shape, levels, scale: float = 1.0):
        super().__init__(z_dim, image_shape, levels)
        h, w, c = image_shape
        self.shape, self.scale = (c * self.likelihood.outputs, h, w), scale
        self.lin = nn.Linear(z_dim, c * self.likelihood.outputs * h * w)

    def decode(self, z):
        return self.likelihood.view(self.scale * self.lin(z).view(len(z), *self.shape), self.image_shape[2])
