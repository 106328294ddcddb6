"""PixelCNN++ network pieces (Salimans et al. 2017, sec. 2), the levels of the Pyramid PixelCNN
(:mod:`fisher.priors.pyramid`).

* **Shifted convolutions** instead of masks (their sec. 2.3): a *down-shifted* convolution (kernel
  kh × kw, kw odd) zero-pads kh-1 rows on top and (kw-1)/2 columns each side, so output (i, j) reads
  rows i-kh+1 … i; a *down-right-shifted* one (kernel kh × kw) pads kh-1 rows on top and kw-1
  columns on the left, so (i, j) reads rows ≤ i and columns ≤ j. The caller pads, the inner
  ``nn.Conv2d`` has no padding, so the per-layer score rules of :mod:`fisher.scores` see the
  padded input.
* **Two streams**: ``u`` sees the rows above ((2, 3) down-shifted kernels; the first layer's
  output is shifted down one row), ``ul`` sees the rows above and the current row to the left
  ((2, 2) down-right-shifted kernels; the first layer is a shifted-down (1, 3) plus a
  shifted-right (2, 1) convolution), so no sub-pixel sees itself or a later pixel, and there is no
  blind spot.
* **Gated ResNet block**: ``c1 = conv(concat_elu(x)) [+ nin(concat_elu(a))]``; dropout on
  ``concat_elu(c1)`` (off in eval); ``c2 = conv(·) [+ V·cond]`` with 2F maps; ``x + c2_a ⊙ σ(c2_b)``.
  ``a`` is the skip input (the u stream for ul, and in the second half the stored activations of
  the first half); ``cond`` is a location-dependent conditioning map (van den Oord et al. 2016,
  eq. 5; PixelCNN++'s ``h``), any function of data known before this image is generated.
* **Stages**: ``stages`` resolutions (PixelCNN++: 3, 32 → 16 → 8), ``nr_resnet`` blocks per stream
  and stage in the first half, a stride-2 shifted convolution between stages; the second half goes
  back up with stride-2 shifted transposed convolutions, ``nr_resnet`` blocks at the lowest stage
  and ``nr_resnet + 1`` at the others, each taking one stored first-half activation as ``a``
  (u: the stored u; ul: [u, stored ul]). A stage of odd size H has a next stage of ceil(H/2); the
  transposed convolution's output is cropped at the bottom/right to the stored size, so any image
  size works. Stage s of the conditioning map is ``cond[..., ::2^s, ::2^s]`` (stage-s position q
  covers full-resolution position 2^s q).
* **Head and the colours of a pixel**: the streams see only earlier *pixels*, so the R → G → B
  order within a pixel has to enter at the head. PixelCNN++ shares one mixture indicator per pixel
  and adds linear coefficients of the earlier colours to the means; the shared head here
  (:class:`fisher.likelihoods.DiscretizedLogisticMixture`) gives every sub-pixel its own mixture,
  so the head is two 1×1 layers with colour-group masks instead (as the Gated PixelCNN's output):
  ``h = W₁·elu(ul) + M_A·x̃`` (x̃: the current pixel's scaled sub-pixels; a hidden map of colour
  group g sees colours < g), ``out = M_B·elu(h)`` (the maps of colour c see hidden groups ≤ c).
  Colour c thus depends on the earlier colours of its pixel non-linearly and through all 3K
  mixture parameters (PixelCNN++'s coefficients are the special case linear in the means). With one
  channel no mask pins anything and the head is a two-layer nin (PixelCNN++: one nin).
* **Left out**: weight normalisation and its data-dependent initialisation (PixelCNN++ uses both):
  plain convolutions keep every parameter a plain ``nn.Conv2d`` weight or bias, so the Fisher
  score is the gradient of exactly the parameters that are stored. The second convolution of each
  block is initialised at 0.1 × the default scale (PixelCNN++'s ``init_scale=0.1``), so every block
  starts close to the identity.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of [x, -x] along the channels (PixelCNN++): 2× the maps."""
    return F.elu(torch.cat([x, -x], dim=1))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Row i ← row i-1 (zeros on top)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Column j ← column j-1 (zeros on the left)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class ShiftedConv2d(nn.Module):
    """``kind='down'``: output (i, j) reads rows i-kh+1 … i, columns j-(kw-1)/2 … j+(kw-1)/2;
    ``kind='down_right'``: rows i-kh+1 … i, columns j-kw+1 … j. With stride 2 an H-row input gives
    ceil(H/2) rows, output q reading around input 2q."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], kind: str, stride: int = 1):
        super().__init__()
        kh, kw = kernel
        if kind == "down":
            if kw % 2 == 0:
                raise ValueError(f"a down-shifted kernel needs an odd width, got {kernel}")
            self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)
        elif kind == "down_right":
            self.pad = (kw - 1, 0, kh - 1, 0)
        else:
            raise ValueError(f"kind={kind!r}: 'down' or 'down_right'")
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class ShiftedConvTranspose2d(nn.Module):
    """Stride-2 transposed convolution of the same shift (output 2q, 2q+1 from input q), cropped at the
    bottom/right to ``size``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], kind: str):
        super().__init__()
        self.left = (kernel[1] - 1) // 2 if kind == "down" else 0
        self.conv = nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=2)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        h, w = size
        return self.conv(x)[:, :, :h, self.left:self.left + w]


class MaskedConv1x1(nn.Conv2d):
    """1×1 convolution ``conv(x, w * mask)``; the ``mask`` buffer keeps pinned weights out of the score."""

    def __init__(self, in_ch: int, out_ch: int, mask: torch.Tensor | None, bias: bool = True):
        super().__init__(in_ch, out_ch, 1, bias=bias)
        self.register_buffer("mask", None if mask is None else mask.view(out_ch, in_ch, 1, 1).float(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        return F.conv2d(x, w, self.bias)


def colour_of(n: int, channels: int) -> torch.Tensor:
    """Colour group (0=R, 1=G, 2=B) of each of ``n`` maps: equal consecutive blocks."""
    return torch.arange(n) * channels // n


STREAM_KERNEL = {"down": (2, 3), "down_right": (2, 2)}


class GatedResnet(nn.Module):
    """PixelCNN++'s gated ResNet block (see the module docstring)."""

    def __init__(self, filters: int, kind: str, skip: int = 0, cond: int = 0, dropout: float = 0.0):
        super().__init__()
        k = STREAM_KERNEL[kind]
        self.conv1 = ShiftedConv2d(2 * filters, filters, k, kind)
        self.skip = nn.Conv2d(2 * skip, filters, 1, bias=False) if skip else None
        self.conv2 = ShiftedConv2d(2 * filters, 2 * filters, k, kind)
        self.cond = nn.Conv2d(cond, 2 * filters, 1, bias=False) if cond else None
        self.dropout = float(dropout)
        with torch.no_grad():
            self.conv2.conv.weight.mul_(0.1)

    def forward(self, x, a=None, cond=None):
        c1 = self.conv1(concat_elu(x))
        if self.skip is not None:
            c1 = c1 + self.skip(concat_elu(a))
        c1 = F.dropout(concat_elu(c1), self.dropout, self.training)
        c2 = self.conv2(c1)
        if self.cond is not None:
            c2 = c2 + self.cond(cond)
        g, gate = c2.chunk(2, dim=1)
        return x + g * torch.sigmoid(gate)


class ColourHead(nn.Module):
    """Final ul stream + the current pixel's earlier colours → head parameters (module docstring)."""

    def __init__(self, filters: int, channels: int, outputs: int):
        super().__init__()
        if filters < channels:
            raise ValueError(f"filters={filters} must be >= channels={channels} (one colour group each)")
        hidden = colour_of(filters, channels)
        self.hidden = nn.Conv2d(filters, filters, 1)
        self.from_x = None
        out_mask = None
        if channels > 1:
            self.from_x = MaskedConv1x1(channels, filters, torch.arange(channels)[None] < hidden[:, None], bias=False)
            out_mask = hidden[None] <= (torch.arange(channels * outputs) // outputs)[:, None]
        self.out = MaskedConv1x1(filters, channels * outputs, out_mask)

    def forward(self, ul: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        h = self.hidden(F.elu(ul))
        if self.from_x is not None:
            h = h + self.from_x(xs)
        return self.out(F.elu(h))


class PixelCNNpp(nn.Module):
    """One PixelCNN++ (see the module docstring): scaled images (B, C, H, W) in [-1, 1] and an optional
    conditioning map (B, cond_channels, H, W) → (head maps (B, C·outputs, H, W), final ul stream)."""

    def __init__(self, channels: int, outputs: int, filters: int = 160, nr_resnet: int = 5, stages: int = 3,
                 dropout: float = 0.0, cond_channels: int = 0):
        super().__init__()
        if min(channels, outputs, filters, nr_resnet, stages) < 1:
            raise ValueError(f"channels, outputs, filters, nr_resnet, stages must be >= 1, got "
                             f"{(channels, outputs, filters, nr_resnet, stages)}")
        f, c_in, cc = filters, channels + 1, cond_channels          # input: the image and a channel of ones
        self.stages, self.nr_resnet = stages, nr_resnet
        self.u_init = ShiftedConv2d(c_in, f, (2, 3), "down")
        self.ul_init_above = ShiftedConv2d(c_in, f, (1, 3), "down")
        self.ul_init_left = ShiftedConv2d(c_in, f, (2, 1), "down_right")

        def blocks(kind, n, skip):
            return nn.ModuleList(GatedResnet(f, kind, skip, cc, dropout) for _ in range(n))

        self.up_u = nn.ModuleList(blocks("down", nr_resnet, 0) for _ in range(stages))
        self.up_ul = nn.ModuleList(blocks("down_right", nr_resnet, f) for _ in range(stages))
        self.down_u = nn.ModuleList(ShiftedConv2d(f, f, (2, 3), "down", stride=2) for _ in range(stages - 1))
        self.down_ul = nn.ModuleList(ShiftedConv2d(f, f, (2, 2), "down_right", stride=2) for _ in range(stages - 1))
        counts = [nr_resnet] + [nr_resnet + 1] * (stages - 1)        # second half, lowest stage first
        self.dn_u = nn.ModuleList(blocks("down", n, f) for n in counts)
        self.dn_ul = nn.ModuleList(blocks("down_right", n, 2 * f) for n in counts)
        self.up_conv_u = nn.ModuleList(ShiftedConvTranspose2d(f, f, (2, 3), "down") for _ in range(stages - 1))
        self.up_conv_ul = nn.ModuleList(ShiftedConvTranspose2d(f, f, (2, 2), "down_right") for _ in range(stages - 1))
        self.head = ColourHead(f, channels, outputs)

    def streams(self, xs: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The final ul stream (B, filters, H, W): the input of the head."""
        conds = [None if cond is None else cond[:, :, ::2 ** s, ::2 ** s] for s in range(self.stages)]
        x = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_above(x)) + right_shift(self.ul_init_left(x))
        us, uls = [u], [ul]
        for s in range(self.stages):
            for bu, bul in zip(self.up_u[s], self.up_ul[s]):
                u = bu(u, cond=conds[s])
                ul = bul(ul, u, conds[s])
                us.append(u)
                uls.append(ul)
            if s + 1 < self.stages:
                u, ul = self.down_u[s](u), self.down_ul[s](ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for i, s in enumerate(reversed(range(self.stages))):
            if i > 0:
                size = us[-1].shape[-2:]
                u, ul = self.up_conv_u[i - 1](u, size), self.up_conv_ul[i - 1](ul, size)
            for bu, bul in zip(self.dn_u[i], self.dn_ul[i]):
                u = bu(u, us.pop(), conds[s])
                ul = bul(ul, torch.cat([u, uls.pop()], dim=1), conds[s])
        assert not us and not uls
        return ul

    def forward(self, xs: torch.Tensor, cond: torch.Tensor | None = None):
        ul = self.streams(xs, cond)
        return self.head(ul, xs), ul
