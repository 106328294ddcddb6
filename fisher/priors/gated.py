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
  C maps); with a conditioning vector ``cond`` (B, d) (their eq. 4), ``V·cond`` is added to f and g in
  every layer of both stacks (``condition_dim`` = d > 0; the conditional PixelCNN decoder uses it); a
  conditioning map ``cond`` (B, d, H, W) (their eq. 5, location dependent) goes through the same V as a
  1×1 convolution, ``V * cond`` (the PixelVAE uses it, a map computed from z: it depends on no pixel, so
  it needs no mask);
* output: ReLU, masked 1×1 (p → p), ReLU, masked 1×1 to the likelihood head (Bernoulli for binary
  data, categorical per sub-pixel otherwise).

Changes from the appendix, stated: its "kernel size 7 and padding 2" would shrink the image at
every layer; every layer here keeps H × W ('same' padding, k//2). Masks are applied in the forward
pass (``conv(x, w * mask)``), never by zeroing weights, so :mod:`fisher.scores` leaves the pinned
weights out of the score; every parameter is a stride-1 convolution's, so the scores take the fast
per-layer path (a conditional model's Linear layers take the generic one). The baseline embedding
(:meth:`GatedPixelCNN.hidden`) is the last layer's horizontal stack, the input of the output layers.

**Sampling** (:meth:`GatedPixelCNN.sample_with`) is autoregressive, pixel by pixel in raster order and
R → G → B within a pixel, the whole batch at once, each sub-pixel by inverse CDF (:func:`inverse_cdf`):
x = the first k with P(x ≤ k) > u, for one uniform u per sub-pixel drawn up front. The sampler is
cached and exact (it computes what the full network computes). With kernel radius r = k // 2:

* the vertical stack's row i depends on input rows ≤ i only, and the horizontal stack reads it shifted
  down one row; so when row i starts, the vertical stack of row i-1 is computed for every layer, once,
  from a rolling cache of the last r+1 rows of that layer's input, and what it adds to the horizontal
  stack of row i (the 1×1 link) is kept for the row;
* within row i, the horizontal stack at (i, j) reads its input at (i, j-r … j): at each colour step only
  pixel (i, j) is computed, layer by layer, from a cache of the row's horizontal inputs per layer, each
  convolution applied at that one position as a matrix product. The mask-B centre tap lets G and B see
  R and G of the same pixel; no feature depends on its own pixel's colours not yet sampled (mask A in
  the first layer), so the values of the last colour step are final and stay cached for the pixels to
  the right;
* the conditioning biases V·cond are computed once per image (a map's: the vertical stack's row i-1
  takes the map's row i-1, the horizontal step at (i, j) the map's (i, j)).

Cost per image: one pass of the vertical stack plus C passes of the horizontal stack and the head
(about 1.3 forward passes of the network at 32 × 32 × 3 with the paper's size), where rerunning the
network for every sub-pixel costs H·W·C forward passes. ``benchmarks/bench_pixelcnn_sampling.py``
measures both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.likelihoods import Likelihood
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


def _cond_bias(linear: nn.Linear, cond: torch.Tensor) -> torch.Tensor:
    """V·cond added to a stack's gates: (B, 2p, 1, 1) for a vector (B, d) (eq. 4), (B, 2p, H, W) for a
    map (B, d, H, W), the same V as a 1×1 convolution (eq. 5)."""
    if cond.dim() == 2:
        return linear(cond)[:, :, None, None]
    return linear(cond.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _matrix(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (masked) weight and bias of a convolution as a linear map of its input window flattened
    channels last, (rows, columns, maps): what the convolution computes at one output position."""
    w = conv.weight if conv.mask is None else conv.weight * conv.mask
    return w.permute(0, 2, 3, 1).flatten(1), conv.bias


def inverse_cdf(likelihood: Likelihood, params: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first k with P(x ≤ k) > u, per sub-pixel: integer (B, C, H, W) for uniforms ``u`` of that shape."""
    cdf = likelihood.log_probs(params).exp().cumsum(dim=2)
    return (cdf <= u.unsqueeze(2)).sum(dim=2).clamp_(max=likelihood.levels - 1)


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
            v = v + _cond_bias(self.cond_v, cond)
            h = h + _cond_bias(self.cond_h, cond)
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

    @torch.no_grad()
    def sample_with(self, u: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The image whose sub-pixels are the inverse CDF of uniforms ``u`` (B, C, H, W) given ``cond`` (None,
        a vector (B, d) or a map (B, d, H, W)), by the cached sampler (module docstring): long (B, C, H, W)."""
        b, c, height, width = u.shape
        r, layers, ref = self.config.kernel_size // 2, self.layers, self.out2.weight
        gates = (b, 2 * self.config.filters, height, width)

        def bias(linear):          # V·cond on every pixel (a vector's: expanded, not copied)
            return (ref.new_zeros(()) if cond is None or linear is None else _cond_bias(linear, cond)).expand(gates)
        bias_v = [bias(layer.cond_v) for layer in layers]
        bias_h = [bias(layer.cond_h) for layer in layers]
        v_to_h = [_matrix(layer.v_to_h) for layer in layers]
        h_maps = [(_matrix(layer.h), _matrix(layer.h_out)) for layer in layers]
        out1, out2 = _matrix(self.out1), _matrix(self.out2)
        # the vertical stack's input rows i-1-r … i-1 per layer, zero-padded by r on both sides
        v_rows = [ref.new_zeros(b, layer.v.in_channels, r + 1, width + 2 * r) for layer in layers]
        v_pre = ref.new_zeros(b, layers[0].v.out_channels, 1, width)     # above row 0: the zero padding
        x = torch.zeros(b, c, height, width, dtype=torch.long, device=u.device)
        for i in range(height):
            # the vertical stack's row i-1 → what the horizontal stack of row i adds (1×1 link, conditioning)
            below = self.scale(x[:, :, i - 1:i]) if i else None
            from_v = []
            for n, layer in enumerate(layers):
                if i:
                    v_rows[n] = torch.cat([v_rows[n][:, :, 1:], F.pad(below, (r, r))], dim=2)
                    v_pre = layer.v(v_rows[n])
                    below = _gate(v_pre + bias_v[n][:, :, i - 1:i])
                from_v.append(F.linear(v_pre[:, :, 0].transpose(1, 2), *v_to_h[n])
                              + bias_h[n][:, :, i].transpose(1, 2))                            # (B, W, maps)
            # the horizontal stack's input of row i per layer, channels last, zero-padded by r on the left
            h_rows = [ref.new_zeros(b, width + r, layer.h.in_channels) for layer in layers]
            for j in range(width):
                for k in range(c):
                    for n, (layer, (h, h_out)) in enumerate(zip(layers, h_maps)):
                        window = h_rows[n][:, j:j + r + 1]
                        out = F.linear(_gate(F.linear(window.flatten(1), *h) + from_v[n][:, j]), *h_out)
                        out = window[:, -1] + out if layer.residual else out
                        if n + 1 < len(layers):
                            h_rows[n + 1][:, j + r] = out
                    params = F.linear(F.relu(F.linear(F.relu(out), *out1)), *out2)[:, :, None, None]
                    params = self.likelihood.view(params, c)[:, k:k + 1]
                    x[:, k, i, j] = inverse_cdf(self.likelihood, params, u[:, k:k + 1, i:i + 1, j:j + 1]).view(b)
                    h_rows[0][:, j + r, k] = self.scale(x[:, k, i, j])
        return x
