"""Pyramid PixelCNN prior (paper sec. 5.2 and appendix 7.1.2; Kolesnikov & Lampert 2017): a
PixelCNN++ (:mod:`fisher.priors.pixelcnnpp`) on a low-resolution view of the image, and conditional
PixelCNN++s that each generate the next resolution given the one below; the paper's CelebA model has
three levels, 8×8 → 32×32 → 128×128.

**The pyramid, and why log p(x) is exact.** ``factors`` (lowest level first) give the resolution
ratios between consecutive levels; level l is the strided subsample ``x_l = x[::s_l, ::s_l]`` with
stride ``s_l = Π factors[l:]`` (the last level is x itself, stride 1), so x_{l-1} = x_l[::f, ::f]
with f = factors[l-1], and a level of an image of any size H × W has ceil(H/s_l) × ceil(W/s_l)
pixels (no divisibility needed, no padding). Every pixel of x belongs to exactly one level: the
lowest whose grid contains it. Level 0 models all of x_0; level l > 0 models only the pixels of x_l
that are not in x_{l-1} (its terms at positions i ≡ j ≡ 0 mod f are dropped: they are x_{l-1}'s), each
conditioned on all of x_{l-1} and on the earlier pixels of x_l in raster order (R → G → B within a
pixel). So x ↦ (x_0, x_1 \\ x_0, …, x \\ x_{L-2}) is a bijection that reorders the sub-pixels of x, and

    log p(x) = log p(x_0) + Σ_{l≥1} log p(x_l \\ x_{l-1} | x_{l-1})

is an exact, normalised log-likelihood of x: an autoregressive model in the pyramid order (level,
then raster, then colour) instead of plain raster order. A box-averaged pyramid (``x_low =
floor(mean of each block)``) would not be: ``p(x_low) · p(x | x_low)`` with a conditional that can put
mass on images whose average is not x_low sums to less than 1 over x (the joint of the pyramid is
normalised, not its value at the one consistent pyramid); it is exact only if the conditional is
truncated to the consistent images, which subsampling gets for free.

**Forward.** Each level's network gives head parameters on its own grid (:meth:`level_params`);
``forward(x)`` places each pixel's parameters, from the level that models it, on x's grid: (B, C,
3K, H, W), so ``likelihood.log_prob(forward(x), x)`` are the per-sub-pixel terms of the pyramid order
and their sum is ``log_prob(x)``; :meth:`level_log_probs` gives the per-level sums (lowest first),
computed from the levels' own outputs. With ``factors=[]`` there is one level, a plain PixelCNN++,
autoregressive in raster order (the configuration the prior contract's raster-causality test uses);
with more levels, a term is causal in the pyramid order (:meth:`level_map` says which level models
each pixel), not in raster order.

**Conditioning.** A level l > 0 sees x_{l-1} through a small non-causal network at x_{l-1}'s
resolution (``cond_layers`` 3×3 convolutions with concat-ELU, on the scaled image and a channel of
ones; ``cond_layers=0``: the scaled x_{l-1} itself), nearest-upsampled by f to x_l's grid (pixel
(i, j) gets low pixel (i // f, j // f)); a 1×1 convolution of it (of its stride-2^s subsample at
stage s) is added inside every gated ResNet block of both streams, before the gate (PixelCNN++'s
``h``; van den Oord et al. 2016, eq. 5, location-dependent). It is a function of x_{l-1} only, known
before level l is generated, so the level stays causal in its own pixels; the 3×3 layers let a
pixel see the low-resolution image below and to the right of it, which the causal streams alone
could not carry to it.

**Likelihood.** :class:`fisher.likelihoods.DiscretizedLogisticMixture` with ``components`` logistics
per sub-pixel (PixelCNN++: 10) over ``levels`` values (5-bit CelebA: 32; binary data works, two bins),
the edge bins taking the tails; the colours of a pixel depend on each other through the masked head
of :class:`fisher.priors.pixelcnnpp.ColourHead` (not PixelCNN++'s shared indicator and linear
coefficients). **Baseline activations** (:meth:`hidden`, the paper's "second-to-last layer"): the
last level's final ul stream, the input of its output head, (B, filters, H, W).

**Defaults** (the paper's 128×128 5-bit RGB CelebA model, "about 20 million parameters" in total):
factors [4, 4] (8 → 32 → 128), 3 stages per level, filters 56, nr_resnet 5 (PixelCNN++'s block
count), 10 logistics, dropout 0.5 (PixelCNN++'s), 2 conditioning layers: 20,668,470 parameters
(6,582,834 for the level-0 PixelCNN++, 6,984,242 for each conditional one, 58,576 for each
conditioning net), 20,663,181 free (Fisher score length; the colour masks pin the rest). The paper
gives nothing more; PixelCNN++'s CIFAR size (160 filters) would be ~53 M per level. A CPU-sized
preset for 32×32 images: ``factors=[2, 4]`` (4 → 8 → 32), ``filters=16, nr_resnet=1, stages=2,
components=5``: 290,471 parameters. Weight normalisation is left out (see
:mod:`fisher.priors.pixelcnnpp`). Every parameter is a plain ``nn.Conv2d`` or
``nn.ConvTranspose2d`` weight or bias, each module called once per forward pass, so
:func:`fisher.scores.fisher_scores` computes every block with a per-layer rule (stride-1,
strided and transposed convolutions; see ``fisher.scores.score_plan``), exact like the vmap
fallback it would take otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.likelihoods import DiscretizedLogisticMixture
from fisher.priors.base import Prior
from fisher.priors.pixelcnnpp import PixelCNNpp, concat_elu
from fisher.priors.registry import PRIORS


def _parse_factors(value) -> list[int]:
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"factors={value!r}: comma-separated integers >= 2, e.g. '4,4'") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    out = []
    for f in value:
        if isinstance(f, bool) or not isinstance(f, int) or f < 2:
            raise ValueError(f"factors={list(value)!r}: every factor must be an integer >= 2")
        out.append(int(f))
    return out


@dataclass
class PyramidPixelCNNConfig:
    """Paper appendix 7.1.2: three levels 8×8 → 32×32 → 128×128 (factors [4, 4]); see the module docstring."""
    channels: int = field(default=3, metadata={"data": True, "help": "image channels (1 grey, 3 RGB)"})
    levels: int = field(default=32, metadata={"data": True, "help": "values per sub-pixel (2^bits; 5-bit: 32)"})
    factors: list[int] | str = field(default_factory=lambda: [4, 4], metadata={
        "help": "resolution ratios between pyramid levels, lowest first (paper: 4,4 = 8->32->128; '' = one level)"})
    filters: int = field(default=56, metadata={"help": "feature maps of each level's streams"})
    nr_resnet: int = field(default=5, metadata={"help": "gated ResNet blocks per stream and stage (PixelCNN++: 5)"})
    stages: int = field(default=3, metadata={"help": "resolutions within each level (PixelCNN++: 3)"})
    components: int = field(default=10, metadata={"help": "logistics per sub-pixel mixture (PixelCNN++: 10)"})
    dropout: float = field(default=0.5, metadata={"help": "dropout in the gated ResNet blocks while training"})
    cond_layers: int = field(default=2, metadata={"help": "3x3 layers on the lower level before conditioning"})

    def __post_init__(self):
        self.factors = _parse_factors(self.factors)
        for name in ("channels", "filters", "nr_resnet", "stages", "components"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.levels < 2:
            raise ValueError(f"levels={self.levels} must be >= 2")
        if self.filters < self.channels:
            raise ValueError(f"filters={self.filters} must be >= channels={self.channels} (one colour group each)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.cond_layers < 0:
            raise ValueError(f"cond_layers={self.cond_layers} must be >= 0")


class ConditionNet(nn.Module):
    """Non-causal features of the scaled lower level (see the module docstring)."""

    def __init__(self, channels: int, filters: int, layers: int):
        super().__init__()
        self.out_channels = filters if layers else channels
        self.convs = nn.ModuleList(nn.Conv2d(channels + 1 if i == 0 else 2 * filters, filters, 3, padding=1)
                                   for i in range(layers))

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        if not len(self.convs):
            return xs
        h = self.convs[0](torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1))
        for conv in self.convs[1:]:
            h = conv(concat_elu(h))
        return h


def _upsample(t: torch.Tensor, factor: int, size) -> torch.Tensor:
    """Nearest upsampling of the last two dims: output (i, j) = input (i // factor, j // factor), cropped."""
    h, w = size
    rows = torch.arange(h, device=t.device) // factor
    cols = torch.arange(w, device=t.device) // factor
    return t.index_select(-2, rows).index_select(-1, cols)


def _on_grid(h: int, w: int, stride: int, device) -> torch.Tensor:
    """(H, W) bool: positions i ≡ j ≡ 0 (mod stride)."""
    return ((torch.arange(h, device=device) % stride == 0)[:, None]
            & (torch.arange(w, device=device) % stride == 0)[None, :])


@PRIORS.register("pyramid", PyramidPixelCNNConfig)
class PyramidPixelCNN(Prior):
    """Pyramid of PixelCNN++s with exact ``log_prob``; see the module docstring."""

    def __init__(self, channels: int = 3, levels: int = 32, factors=None, filters: int = 56, nr_resnet: int = 5,
                 stages: int = 3, components: int = 10, dropout: float = 0.5, cond_layers: int = 2):
        cfg = PyramidPixelCNNConfig(channels, levels, [4, 4] if factors is None else factors, filters, nr_resnet,
                                    stages, components, dropout, cond_layers)
        super().__init__(cfg.channels, cfg.levels, DiscretizedLogisticMixture(cfg.levels, cfg.components))
        self.config = cfg
        self.factors = list(cfg.factors)
        n = len(self.factors) + 1
        self.strides = [1] * n                                      # level l = x[::strides[l], ::strides[l]]
        for l in reversed(range(n - 1)):
            self.strides[l] = self.strides[l + 1] * self.factors[l]
        self.cond_nets = nn.ModuleList(ConditionNet(cfg.channels, cfg.filters, cfg.cond_layers) for _ in range(n - 1))
        cond_ch = cfg.filters if cfg.cond_layers else cfg.channels
        self.nets = nn.ModuleList(
            PixelCNNpp(cfg.channels, self.likelihood.outputs, cfg.filters, cfg.nr_resnet, cfg.stages, cfg.dropout,
                       cond_channels=0 if l == 0 else cond_ch) for l in range(n))

    @property
    def n_levels(self) -> int:
        return len(self.nets)

    def level_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """(height, width) of every level for an H × W image, lowest first."""
        return [(-(-h // s), -(-w // s)) for s in self.strides]

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The levels x_0, …, x_L = x: strided subsamples, lowest first."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"images {tuple(x.shape)}: expected (B, {self.channels}, H, W)")
        return [x if s == 1 else x[:, :, ::s, ::s] for s in self.strides]

    def _run(self, x: torch.Tensor):
        imgs = self.pyramid(x)
        params, ul = [], None
        for l, (net, img) in enumerate(zip(self.nets, imgs)):
            cond = None
            if l > 0:
                low = self.cond_nets[l - 1](self.scale(imgs[l - 1]))
                cond = _upsample(low, self.factors[l - 1], img.shape[-2:])
            out, ul = net(self.scale(img), cond)
            params.append(self.likelihood.view(out, self.channels))
        return imgs, params, ul

    def level_params(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Head parameters of every level on its own grid, (B, C, 3K, h_l, w_l), lowest first."""
        return self._run(x)[1]

    def level_terms(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-sub-pixel log-likelihood terms of every level on its own grid, (B, C, h_l, w_l); a level
        l > 0 has zeros at the positions that belong to level l-1."""
        imgs, params, _ = self._run(x)
        terms = []
        for l, (img, p) in enumerate(zip(imgs, params)):
            t = self.likelihood.log_prob(p, img)
            if l > 0:
                t = torch.where(_on_grid(*img.shape[-2:], self.factors[l - 1], x.device), torch.zeros_like(t), t)
            terms.append(t)
        return terms

    def level_log_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[log p(x_0), log p(x_1 | x_0), …, log p(x | x_{L-1})], each Tensor[B]; their sum is ``log_prob(x)``."""
        return [t.flatten(1).sum(1) for t in self.level_terms(x)]

    def level_map(self, h: int, w: int) -> torch.Tensor:
        """(H, W) long: the level that models each pixel of an H × W image (the pyramid order's first key)."""
        m = torch.full((h, w), self.n_levels - 1, dtype=torch.long)
        for l in reversed(range(self.n_levels - 1)):
            m[_on_grid(h, w, self.strides[l], "cpu")] = l
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head parameters (B, C, 3K, H, W) on x's grid, each pixel's from the level that models it."""
        _, params, _ = self._run(x)
        h, w = x.shape[-2:]
        out = params[-1]
        for l in reversed(range(self.n_levels - 1)):
            s = self.strides[l]
            out = torch.where(_on_grid(h, w, s, x.device), _upsample(params[l], s, (h, w)), out)
        return out

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last level's final ul stream (the input of its output head): the baseline activations."""
        return self._run(x)[2]
