"""Conditional PixelCNN decoder p(x | z) (paper sec. 5.2 and appendix 7.2; van den Oord et al. 2016).

The network is the Gated PixelCNN of the prior (:class:`fisher.priors.gated.GatedPixelCNN`, paper
appendix 7.1.2: 5 layers, 120 filters, kernel 7) with conditioning vector h = z, the standardized
embedding: V·h is added inside every gate of both stacks (van den Oord et al. eq. 4). It is trained by
maximum likelihood; ``loss`` is the exact -log p(x | z) in nats per image, each sub-pixel's term of the
likelihood head (Bernoulli for binary data, categorical per sub-pixel otherwise) taken with the true
image as the input (teacher forcing). There is no closed-form mean: interpolation strips and FID
decode by sampling (``generates = "sample"``).

Sampling is autoregressive, pixel by pixel in raster order and R → G → B within a pixel, the whole
batch at once, each sub-pixel by inverse CDF: x = the first k with P(x ≤ k) > u, for one uniform u per
sub-pixel drawn up front. Without a generator each image draws its uniforms from its own generator,
seeded by ``sample_seed`` and its embedding row, so the same z decodes to the same image whatever the
batch it is in.

The sampler is cached and exact (it computes what the full network computes). With kernel radius
r = k // 2:

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
* the conditioning biases V·h are computed once per image.

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

from fisher.decoders.base import Decoder, row_generators
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError
from fisher.likelihoods import Likelihood


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


def _matrix(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (masked) weight and bias of a convolution as a linear map of its input window flattened
    channels last, (rows, columns, maps): what the convolution computes at one output position."""
    w = conv.weight if conv.mask is None else conv.weight * conv.mask
    return w.permute(0, 2, 3, 1).flatten(1), conv.bias


def inverse_cdf(likelihood: Likelihood, params: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first k with P(x ≤ k) > u, per sub-pixel: integer (B, C, H, W) for uniforms ``u`` of that shape."""
    cdf = likelihood.log_probs(params).exp().cumsum(dim=2)
    return (cdf <= u.unsqueeze(2)).sum(dim=2).clamp_(max=likelihood.levels - 1)


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
        """The image whose sub-pixels are the inverse CDF of uniforms ``u`` (B, C, H, W), by the cached
        sampler (module docstring)."""
        from fisher.priors.gated import _gate
        net, cond = self.net, self.standardize(z)
        b, c, height, width = u.shape
        r = net.config.kernel_size // 2
        layers = net.layers
        bias_v = [layer.cond_v(cond)[:, :, None, None] for layer in layers]
        bias_h = [layer.cond_h(cond)[:, None] for layer in layers]
        v_to_h = [_matrix(layer.v_to_h) for layer in layers]
        h_maps = [(_matrix(layer.h), _matrix(layer.h_out)) for layer in layers]
        out1, out2 = _matrix(net.out1), _matrix(net.out2)
        # the vertical stack's input rows i-1-r … i-1 per layer, zero-padded by r on both sides
        v_rows = [cond.new_zeros(b, layer.v.in_channels, r + 1, width + 2 * r) for layer in layers]
        v_pre = cond.new_zeros(b, layers[0].v.out_channels, 1, width)     # above row 0: the zero padding
        x = torch.zeros(b, c, height, width, dtype=torch.long, device=u.device)
        for i in range(height):
            # the vertical stack's row i-1 → what the horizontal stack of row i adds (1×1 link, conditioning)
            below = net.scale(x[:, :, i - 1:i]) if i else None
            from_v = []
            for n, layer in enumerate(layers):
                if i:
                    v_rows[n] = torch.cat([v_rows[n][:, :, 1:], F.pad(below, (r, r))], dim=2)
                    v_pre = layer.v(v_rows[n])
                    below = _gate(v_pre + bias_v[n])
                from_v.append(F.linear(v_pre[:, :, 0].transpose(1, 2), *v_to_h[n]) + bias_h[n])    # (B, W, maps)
            # the horizontal stack's input of row i per layer, channels last, zero-padded by r on the left
            h_rows = [cond.new_zeros(b, width + r, layer.h.in_channels) for layer in layers]
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
                    h_rows[0][:, j + r, k] = net.scale(x[:, k, i, j])
        return x
