"""PixelCNN priors p_θ(x) (paper appendix 7.1; van den Oord et al. 2016).

Masked convolutions, mask A on the first layer and B after it, kernel 7,
64 filters, ReLU; 5 layers for MNIST and CelebA, 1 layer for the small CelebA
prior. A 1×1 masked output convolution maps the last hidden layer to:

* one Bernoulli logit per pixel when ``levels == 2`` (binarized MNIST);
* ``levels`` logits per sub-pixel otherwise (5-bit RGB: 32-way categorical),
  with the R→G→B ordering enforced by channel-group masks.

Masks are applied as ``conv(x, w * mask)``; ``w`` is never edited in place,
so the masked-out weights are pinned (their gradient is exactly zero) and
:mod:`fisher.scores` leaves them out of the Fisher score.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PixelCNNConfig:
    """Paper appendix 7.1.1 (MNIST): 5 masked layers, kernel 7, 64 filters."""
    channels: int = 1        # image channels (1 grey, 3 RGB)
    levels: int = 2          # values per sub-pixel: 2 = binary, 32 = 5-bit
    n_layers: int = 5        # masked kernel-7 layers (paper: 5, or 1 for CelebA)
    filters: int = 64
    kernel_size: int = 7


def _group(index: int, total: int, channels: int) -> int:
    """Colour group (0=R, 1=G, 2=B) of feature map ``index`` out of ``total``."""
    return index * channels // total


def causal_mask(out_ch: int, in_ch: int, k: int, mask_type: str, channels: int) -> torch.Tensor:
    """Mask of shape (out, in, k, k): 1 where a weight is free, 0 where it is pinned.

    Pixels above, and left in the same row, are visible. At the centre pixel
    feature maps are split into ``channels`` colour groups: an output in group
    g sees input groups < g (mask A) or <= g (mask B).
    """
    mask = torch.zeros(out_ch, in_ch, k, k)
    c = k // 2
    mask[:, :, :c, :] = 1
    mask[:, :, c, :c] = 1
    for o in range(out_ch):
        go = _group(o, out_ch, channels)
        for i in range(in_ch):
            gi = _group(i, in_ch, channels)
            if gi < go or (mask_type == "B" and gi == go):
                mask[o, i, c, c] = 1
    return mask


class MaskedConv2d(nn.Conv2d):
    """Conv2d computing ``conv(x, weight * mask)`` with 'same' padding."""

    def __init__(self, in_ch: int, out_ch: int, k: int, mask_type: str, channels: int):
        super().__init__(in_ch, out_ch, k, padding=k // 2)
        self.register_buffer("mask", causal_mask(out_ch, in_ch, k, mask_type, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Autoregressive prior with exact ``log_prob``; see the module docstring."""

    def __init__(self, config: PixelCNNConfig | None = None, **overrides):
        super().__init__()
        cfg = config or PixelCNNConfig()
        if overrides:
            cfg = PixelCNNConfig(**{**asdict(cfg), **overrides})
        if cfg.levels < 2 or cfg.n_layers < 1 or cfg.channels < 1:
            raise ValueError(f"invalid PixelCNN config {cfg}")
        self.config = cfg
        k, f, ch = cfg.kernel_size, cfg.filters, cfg.channels
        layers = [MaskedConv2d(ch, f, k, "A", ch)]
        layers += [MaskedConv2d(f, f, k, "B", ch) for _ in range(cfg.n_layers - 1)]
        self.hidden_layers = nn.ModuleList(layers)
        self.out_per_channel = 1 if cfg.levels == 2 else cfg.levels
        self.output = MaskedConv2d(f, ch * self.out_per_channel, 1, "B", ch)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Integer sub-pixel values in [0, levels) → floats in [-1, 1]."""
        return x.float() * (2.0 / (self.config.levels - 1)) - 1.0

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the last hidden (second-to-last conv) layer: the paper's baseline embedding."""
        h = self.scale(x)
        for layer in self.hidden_layers:
            h = F.relu(layer(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (B, C, H, W) for binary data, (B, C, levels, H, W) otherwise."""
        out = self.output(self.hidden(x))
        if self.out_per_channel == 1:
            return out
        b, _, h, w = out.shape
        return out.view(b, self.config.channels, self.out_per_channel, h, w)

    def log_prob_from_logits(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.out_per_channel == 1:
            xf = x.to(logits.dtype)
            ll = xf * logits - F.softplus(logits)          # log Bernoulli(x; sigmoid(logits))
        else:
            ll = torch.log_softmax(logits, dim=2).gather(2, x.long().unsqueeze(2)).squeeze(2)
        return ll.flatten(1).sum(1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p_θ(x) in nats, one value per image. ``x``: (B, C, H, W) integers in [0, levels)."""
        return self.log_prob_from_logits(self(x), x)


def to_model_input(images, device=None) -> torch.Tensor:
    """uint8 images (N, H, W, C) as stored in shards → long tensor (N, C, H, W)."""
    t = torch.as_tensor(images).permute(0, 3, 1, 2)
    return torch.empty(t.shape, dtype=torch.long).copy_(t).to(device)   # plain NCHW strides, also for C=1


WEIGHTS, CONFIG = "weights.pt", "model.json"


def prior_files(model: PixelCNN) -> dict[str, bytes]:
    """A prior checkpoint's files: weights as a plain state dict of tensors, config as JSON."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return {WEIGHTS: buf.getvalue(),
            CONFIG: json.dumps({"arch": "pixelcnn", **asdict(model.config)}, indent=2).encode()}


def save_prior(model: PixelCNN, directory: str) -> None:
    """Write :func:`prior_files` into ``directory`` (local path or URI), atomically per file."""
    from fisher.io import atomic_write_bytes, join
    for name, data in prior_files(model).items():
        atomic_write_bytes(join(str(directory), name), data)


def prior_from_files(files: dict[str, bytes], where: str = "checkpoint", map_location="cpu") -> PixelCNN:
    """Build a PixelCNN from checkpoint files; never unpickles code (``weights_only=True``)."""
    from fisher.io import FisherError
    try:
        cfg = json.loads(files[CONFIG])
    except KeyError as e:
        raise FisherError(f"{where}/{CONFIG}: missing; pass a prior checkpoint directory made by `fisher train-prior`") from e
    except json.JSONDecodeError as e:
        raise FisherError(f"{where}/{CONFIG}: not valid JSON ({e})") from e
    arch = cfg.pop("arch", None)
    if arch != "pixelcnn":
        raise FisherError(f"{where}/{CONFIG}: unknown architecture {arch!r}; expected 'pixelcnn'")
    try:
        model = PixelCNN(PixelCNNConfig(**cfg))
    except (TypeError, ValueError) as e:
        raise FisherError(f"{where}/{CONFIG}: invalid model config ({e})") from e
    from fisher.checkpoints import load_weights
    return load_weights(model, files.get(WEIGHTS), f"{where}/{WEIGHTS}", CONFIG, "rerun `fisher train-prior`",
                        map_location)


def load_prior(directory: str, map_location="cpu") -> PixelCNN:
    """Load a prior saved by :func:`save_prior` from a local path or URI."""
    from fisher.checkpoints import read_files
    return prior_from_files(read_files(directory, (WEIGHTS, CONFIG)), str(directory), map_location)
