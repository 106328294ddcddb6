"""PixelCNN prior (paper appendix 7.1; van den Oord et al. 2016).

Masked convolutions, mask A on the first layer and B after it, kernel 7, 64 filters, ReLU;
5 layers for MNIST and CelebA, 1 layer for the small CelebA prior. A 1×1 masked output
convolution maps the last hidden layer to the likelihood head's parameters: one Bernoulli
logit per pixel when ``levels == 2`` (binarized MNIST), ``levels`` logits per sub-pixel
otherwise (5-bit RGB: 32-way categorical), with the R→G→B order enforced by channel-group
masks (:mod:`fisher.priors.layers`). The baseline embedding (:meth:`PixelCNN.hidden`) is the
last hidden layer: the second-to-last conv.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.priors.base import Prior
from fisher.priors.layers import MaskedConv2d
from fisher.priors.registry import PRIORS


@dataclass
class PixelCNNConfig:
    """Paper appendix 7.1.1 (MNIST): 5 masked layers, kernel 7, 64 filters."""
    channels: int = field(default=1, metadata={"data": True, "help": "image channels (1 grey, 3 RGB)"})
    levels: int = field(default=2, metadata={"data": True, "help": "values per sub-pixel (2 binary, 32 5-bit)"})
    n_layers: int = field(default=5, metadata={"flag": "layers", "help": "masked 7x7 layers (paper: 5, or 1)"})
    filters: int = field(default=64, metadata={"help": "filters per layer (paper: 64)"})
    kernel_size: int = field(default=7, metadata={"flag": "kernel", "help": "kernel size (paper: 7)"})

    def __post_init__(self):
        for name in ("channels", "n_layers", "filters", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.levels < 2:
            raise ValueError(f"levels={self.levels} must be >= 2")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd")


@PRIORS.register("pixelcnn", PixelCNNConfig)
class PixelCNN(Prior):
    """Autoregressive prior with exact ``log_prob``; see the module docstring."""

    def __init__(self, config: PixelCNNConfig | None = None, **overrides):
        cfg = config or PixelCNNConfig()
        if overrides:
            cfg = PixelCNNConfig(**{**asdict(cfg), **overrides})
        super().__init__(cfg.channels, cfg.levels)
        self.config = cfg
        k, f, ch = cfg.kernel_size, cfg.filters, cfg.channels
        layers = [MaskedConv2d(ch, f, k, "A", ch)]
        layers += [MaskedConv2d(f, f, k, "B", ch) for _ in range(cfg.n_layers - 1)]
        self.hidden_layers = nn.ModuleList(layers)
        self.out_per_channel = self.likelihood.outputs
        self.output = MaskedConv2d(f, ch * self.out_per_channel, 1, "B", ch)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the last hidden (second-to-last conv) layer: the paper's baseline embedding."""
        h = self.scale(x)
        for layer in self.hidden_layers:
            h = F.relu(layer(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (B, C, H, W) for binary data, (B, C, levels, H, W) otherwise."""
        return self.likelihood.view(self.output(self.hidden(x)), self.channels)
