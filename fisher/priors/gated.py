"""Gated PixelCNN prior (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders", sec. 2; paper appendix 7.1.2: 5 layers, 120 filters, kernel 7).

Two stacks remove the PixelCNN's blind spot (their sec. 2.2):

* the **vertical stack** sees the rows above: a (k//2+1) × k convolution of the zero-padded input,
  so its row i reads rows i-k//2 … i; it reaches the horizontal stack only shifted down one row
  (rows < i), so it needs no mask;
* the **horizontal stack** sees the current row up to the current pixel: a 1 × (k//2+1) convolution
  of the left-padded input whose last tap (the current pixel) is masked by colour group, mask A in
  the first layer and B after (R→G→B within a pixel, as the PixelCNN's masks);
* each layer: ``v = W_v * v_in``, ``h = W_h * h_in + W_vh · shift_down(v)`` (the vertical-to-horizontal
  1×1 link), gated units ``tanh(f) ⊙ σ(g)`` on both (the 2p maps split into f and g), and a residual
  ``h_out = h_in + W_r · gate(h)`` in the horizontal stack (not in the first layer, whose input has
  C maps); with a conditioning vector ``cond`` (their eq. 4), ``V·cond`` is added to f and g in every
  layer of both stacks (``condition_dim`` > 0; the conditional PixelCNN decoder uses it);
* output: ReLU, masked 1×1 (p → p), ReLU, masked 1×1 to the likelihood head (Bernoulli for binary
  data, categorical per sub-pixel otherwise).

Changes from the appendix, stated: its "kernel size 7 and padding 2" would shrink the image at
every layer; every layer here keeps H × W ('same' padding, k//2). Masks are applied in the forward
pass (``conv(x, w * mask)``), never by zeroing weights, so :mod:`fisher.scores` leaves the pinned
weights out of the score; every parameter is a stride-1 convolution's, so the scores take the fast
per-layer path (a conditional model's Linear layers take the generic one). The baseline embedding
(:meth:`GatedPixelCNN.hidden`) is the last layer's horizontal stack, the input of the output layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.priors.base import Prior
from fisher.priors.registry import PRIORS


@dataclass
class GatedPixelCNNConfig:
    """Paper appendix 7.1.2: 5 gated layers, 120 filters, kernel 7."""
    channels: int = field(default=1, metadata={"data": True, "help": "image channels (1 grey, 3 RGB)"})
    levels: int = field(default=2, metadata={"data": True, "help": "values per sub-pixel"})
    n_layers: int = field(default=5, metadata={"flag": "layers", "help": "gated layers (paper: 5)"})
    filters: int = field(default=120, metadata={"help": "feature maps per stack (paper: 120)"})
    kernel_size: int = field(default=7, metadata={"flag": "kernel", "help": "kernel size (paper: 7)"})
    condition_dim: int = field(default=0, metadata={"data": True,
                                                    "help": "length of a conditioning vector (0: unconditional)"})

    def __post_init__(self):
        for name in ("channels", "n_layers", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.levels < 2:
            raise ValueError(f"levels={self.levels} must be >= 2")
        if self.kernel_size % 2 == 0 or self.kernel_size < 3:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd and >= 3")
        if self.filters < self.channels:
            raise ValueError(f"filters={self.filters} must be >= channels={self.channels} (one colour group each)")
        if self.condition_dim < 0:
            raise ValueError(f"condition_dim={self.condition_dim} must be >= 0")


def colour_groups(n: int, channels: int) -> list[int]:
    """Colour group (0=R, 1=G, 2=B) of each of ``n`` feature maps."""
    return [i * channels // n for i in range(n)]


def tap_mask(out_groups: list[int], in_groups: list[int], kh: int, kw: int, mask_type: str) -> torch.Tensor:
    """(out, in, kh, kw) mask, 1 everywhere but the last tap (the current pixel), where an output of
    colour group g sees inputs of groups < g (mask A) or <= g (mask B)."""
    mask = torch.ones(len(out_groups), len(in_groups), kh, kw)
    go = torch.tensor(out_groups).view(-1, 1)
    gi = torch.tensor(in_groups).view(1, -1)
    mask[:, :, -1, -1] = ((gi < go) | ((gi == go) & (mask_type == "B"))).float()
    return mask


class TapConv(nn.Conv2d):
    """A stride-1 convolution without padding (the caller pads), optionally masked: ``conv(x, w * mask)``."""

    def __init__(self, in_ch: int, out_ch: int, kh: int, kw: int, mask: torch.Tensor | None = None):
        super().__init__(in_ch, out_ch, (kh, kw))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        return F.conv2d(x, w, self.bias)


def _gate(x: torch.Tensor) -> torch.Tensor:
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One layer of both stacks (van den Oord et al. 2016, Figure 2)."""

    def __init__(self, in_ch: int, p: int, k: int, channels: int, first: bool, condition_dim: int = 0):
        super().__init__()
        r = k // 2
        self.v_pad, self.h_pad = (r, r, r, 0), (r, 0, 0, 0)
        gates = colour_groups(p, channels) * 2               # f and g halves: map m of each in the same group
        self.v = TapConv(in_ch, 2 * p, r + 1, k)
        self.h = TapConv(in_ch, 2 * p, 1, r + 1, tap_mask(gates, colour_groups(in_ch, channels), 1, r + 1,
                                                           "A" if first else "B"))
        self.v_to_h = TapConv(2 * p, 2 * p, 1, 1)            # reads rows above only: no mask
        self.residual = not first
        groups = colour_groups(p, channels)
        self.h_out = TapConv(p, p, 1, 1, tap_mask(groups, groups, 1, 1, "B"))
        self.cond_v = nn.Linear(condition_dim, 2 * p, bias=False) if condition_dim else None
        self.cond_h = nn.Linear(condition_dim, 2 * p, bias=False) if condition_dim else None

    def forward(self, v_in, h_in, cond=None):
        v = self.v(F.pad(v_in, self.v_pad))
        h = self.h(F.pad(h_in, self.h_pad)) + self.v_to_h(F.pad(v, (0, 0, 1, 0))[:, :, :-1])
        if cond is not None and self.cond_v is not None:
            v = v + self.cond_v(cond)[:, :, None, None]
            h = h + self.cond_h(cond)[:, :, None, None]
        h_out = self.h_out(_gate(h))
        return _gate(v), (h_in + h_out if self.residual else h_out)


@PRIORS.register("gated", GatedPixelCNNConfig)
class GatedPixelCNN(Prior):
    """Gated PixelCNN with exact ``log_prob``; see the module docstring."""

    def __init__(self, channels: int = 1, levels: int = 2, n_layers: int = 5, filters: int = 120,
                 kernel_size: int = 7, condition_dim: int = 0):
        super().__init__(channels, levels)
        self.config = GatedPixelCNNConfig(channels, levels, n_layers, filters, kernel_size, condition_dim)
        p, k = filters, kernel_size
        self.layers = nn.ModuleList([GatedLayer(channels if i == 0 else p, p, k, channels, i == 0, condition_dim)
                                     for i in range(n_layers)])
        groups = colour_groups(p, channels)
        outputs = self.likelihood.outputs
        self.out1 = TapConv(p, p, 1, 1, tap_mask(groups, groups, 1, 1, "B"))
        self.out2 = TapConv(p, channels * outputs, 1, 1,
                            tap_mask([i // outputs for i in range(channels * outputs)], groups, 1, 1, "B"))

    def hidden_scaled(self, xs: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        v = h = xs
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return h

    def hidden(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's horizontal stack: the paper's baseline activations for this prior."""
        return self.hidden_scaled(self.scale(x), cond)

    def forward_scaled(self, xs: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Head parameters from inputs already scaled to [-1, 1] (lets a test differentiate by the input)."""
        h = self.out2(F.relu(self.out1(F.relu(self.hidden_scaled(xs, cond)))))
        return self.likelihood.view(h, self.channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_scaled(self.scale(x), cond)
