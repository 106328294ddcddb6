"""Decoders z → x (paper sec. 4.2, appendix 7.2) and their objective.

A decoder maps an embedding ``z`` (B, z_dim) to per-sub-pixel logits with the
same layout as the PixelCNN prior's output (:mod:`fisher.models`):

* ``levels == 2`` (binarized MNIST): one Bernoulli logit per pixel and
  channel, shape (B, C, H, W). The appendix's "2 filters" last layer is a
  2-way softmax; logits (a, b) give p(x=1) = sigmoid(b - a), so one logit
  is the same model with no redundant parameter.
* ``levels > 2`` (5-bit CelebA: 32): ``levels`` categorical logits per
  sub-pixel, shape (B, C, levels, H, W).

Decoders live in a registry (:data:`DECODERS`, :func:`register_decoder`,
:func:`build_decoder`), so other decoders (RealNVP, WGAN-GP, conditional
PixelCNN) plug in without changes to the stages. Every decoder class is built
as ``cls(z_dim, image_shape, levels, **config)`` with ``image_shape = (H, W, C)``
(the shard layout), subclasses :class:`Decoder` and implements ``decode``.

Input standardization: :class:`Decoder` standardizes ``z`` per coordinate
with the train split's mean and standard deviation (buffers ``z_mean``,
``z_scale``, set by :func:`fit_decoder`, saved with the weights). Paper sec.
3.2: the Fisher kernel is approximated by dot products of *standardized*
Fisher scores. Raw scores span orders of magnitude, and a decoder fed them
unscaled learns little more than the mean image. The map is affine, so the
paper's interpolation (1-α)z₁ + αz₂ and attribute vectors are unchanged by it.

Objective and metrics (integer targets ``x`` (B, C, H, W) in [0, levels)):

* :func:`reconstruction_loss`: per-image negative log-likelihood in nats,
  -log p(x | z) summed over sub-pixels (Bernoulli for binary data,
  categorical otherwise). The decoder is trained on its batch mean.
* :func:`reconstruction_metrics` returns *sums* over a batch, so averages
  over many batches are exact: ``nll_sum`` (nats, summed over all
  sub-pixels), ``se_sum`` (squared errors on the [0, 1] pixel scale),
  ``n_subpixels`` (B·C·H·W) and ``n_images``. :func:`summarize_metrics`
  adds any number of them up and gives

  - ``bce_nats_per_pixel`` = nll_sum / n_subpixels: the mean per-sub-pixel
    NLL in nats (binary or categorical cross-entropy);
  - ``mse`` = se_sum / n_subpixels: the mean of (E[x̂] - x/(levels-1))²,
    where E[x̂] is the decoder's expected value on [0, 1] (sigmoid for binary
    data, Σ_k p_k · k/(levels-1) for categorical), see :func:`decode_mean`;
  - ``nll_nats_per_image`` = nll_sum / n_images.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.io import FisherError

DECODERS: dict[str, type] = {}


def register_decoder(name: str):
    """Class decorator adding a decoder to :data:`DECODERS` under ``name``."""
    def add(cls: type) -> type:
        if not issubclass(cls, Decoder):
            raise TypeError(f"decoder {name!r}: {cls.__name__} must subclass fisher.decoders.Decoder")
        DECODERS[name] = cls
        return cls
    return add


def build_decoder(name: str, z_dim: int, image_shape, levels: int, **config) -> nn.Module:
    """Instantiate registered decoder ``name`` for embeddings of size ``z_dim`` and images (H, W, C)."""
    if name not in DECODERS:
        raise FisherError(f"unknown decoder {name!r}; registered decoders: {', '.join(sorted(DECODERS))}")
    h, w, c = (int(v) for v in image_shape)
    if z_dim < 1 or levels < 2 or min(h, w, c) < 1:
        raise FisherError(f"decoder {name!r}: invalid z_dim={z_dim}, image_shape={tuple(image_shape)} "
                          f"or levels={levels}; need z_dim >= 1, levels >= 2 and positive sizes")
    try:
        return DECODERS[name](int(z_dim), (h, w, c), int(levels), **config)
    except TypeError as e:
        raise FisherError(f"decoder {name!r}: invalid config {config} ({e})") from e


class Decoder(nn.Module):
    """Base of every registered decoder: ``forward(z) = decode((z - z_mean) / z_scale)``."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("z_mean", torch.zeros(z_dim))
        self.register_buffer("z_scale", torch.ones(z_dim))

    @torch.no_grad()
    def fit_input(self, z: torch.Tensor) -> None:
        """Set the standardization from the train embeddings ``z`` (N, z_dim); constant coordinates keep scale 1."""
        z = z.to(self.z_mean.device, torch.float64)
        std = z.std(dim=0) if z.shape[0] > 1 else torch.zeros_like(z[0])
        self.z_mean.copy_(z.mean(dim=0))
        self.z_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode((z - self.z_mean) / self.z_scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _logits_per_channel(levels: int) -> int:
    return 1 if levels == 2 else levels


def _as_logits(out: torch.Tensor, channels: int, levels: int) -> torch.Tensor:
    """(B, C·k, H, W) conv output → (B, C, H, W) binary or (B, C, levels, H, W) categorical logits."""
    if levels == 2:
        return out
    b, _, h, w = out.shape
    return out.view(b, channels, levels, h, w)


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


@register_decoder("conv")
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
        super().__init__(z_dim)
        h, w, c = image_shape
        self.channels, self.levels = c, levels
        hs, ws = _halvings(h, 3), _halvings(w, 3)
        self.start = (base_channels, hs[0], ws[0])
        op = [(hs[i + 1] - (2 * hs[i] - 1), ws[i + 1] - (2 * ws[i] - 1)) for i in range(3)]
        up = lambda cin, cout, i: nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=op[i])
        self.linear = nn.Linear(z_dim, base_channels * hs[0] * ws[0])
        self.net = nn.Sequential(
            up(base_channels, 128, 0), nn.ReLU(), ResBlock(128),
            up(128, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
            up(32, c * _logits_per_channel(levels), 2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.linear(z)).view(z.shape[0], *self.start)
        return _as_logits(self.net(h), self.channels, self.levels)


@register_decoder("celeba_conv")
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
        super().__init__(z_dim)
        h, w, c = image_shape
        n_up = math.log2(h / 4) if h >= 4 else -1
        if h != w or n_up != int(n_up) or n_up < 0:
            raise FisherError(f"decoder 'celeba_conv': image size {h}x{w} is not supported; "
                              "it needs square images of side 4·2^k (32, 64, 128); use decoder 'conv'")
        self.channels, self.levels = c, levels
        layers = [nn.ConvTranspose2d(z_dim, channels, 4)]
        for _ in range(int(n_up)):
            layers += [ResBlock(channels), nn.Upsample(scale_factor=2)]
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, c * _logits_per_channel(levels), 1)]
        self.net = nn.Sequential(*layers)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return _as_logits(self.net(z[:, :, None, None]), self.channels, self.levels)


# ---------------------------------------------------------------- objective, metrics, decoding

def _subpixel_nll(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """-log p(x | z) per sub-pixel, shape (B, C, H, W)."""
    if levels == 2:
        if logits.shape != x.shape:
            raise FisherError(f"decoder logits {tuple(logits.shape)} do not match images {tuple(x.shape)}")
        return F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none")
    if logits.dim() != 5 or logits.shape[2] != levels or logits.shape[:2] + logits.shape[3:] != x.shape:
        raise FisherError(f"decoder logits {tuple(logits.shape)} do not match images {tuple(x.shape)} "
                          f"with {levels} levels")
    return F.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none")


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-image -log p(x | z) in nats, Tensor[B] (see the module docstring)."""
    return _subpixel_nll(logits, x, levels).flatten(1).sum(1)


def decode_mean(logits: torch.Tensor, levels: int) -> torch.Tensor:
    """Expected image E[x̂] on [0, 1], float (B, C, H, W)."""
    if levels == 2:
        return torch.sigmoid(logits)
    values = torch.arange(levels, dtype=logits.dtype, device=logits.device) / (levels - 1)
    return torch.einsum("bckhw,k->bchw", torch.softmax(logits, dim=2), values)


def decode_mode(logits: torch.Tensor, levels: int) -> torch.Tensor:
    """Most likely integer image in [0, levels), long (B, C, H, W)."""
    return (logits > 0).long() if levels == 2 else logits.argmax(dim=2)


@torch.no_grad()
def reconstruction_metrics(logits: torch.Tensor, x: torch.Tensor, levels: int) -> dict:
    """Batch sums ``nll_sum``, ``se_sum``, ``n_subpixels``, ``n_images`` (module docstring)."""
    nll = _subpixel_nll(logits, x, levels)
    se = (decode_mean(logits, levels) - x.to(logits.dtype) / (levels - 1)).square()
    return {"nll_sum": float(nll.double().sum()), "se_sum": float(se.double().sum()),
            "n_subpixels": x.numel(), "n_images": x.shape[0]}


def summarize_metrics(*parts: dict) -> dict:
    """Sum :func:`reconstruction_metrics` dicts and give ``bce_nats_per_pixel``, ``mse``, ``nll_nats_per_image``."""
    tot = {k: sum(p[k] for p in parts) for k in ("nll_sum", "se_sum", "n_subpixels", "n_images")}
    n = max(tot["n_subpixels"], 1)
    return {"bce_nats_per_pixel": tot["nll_sum"] / n, "mse": tot["se_sum"] / n,
            "nll_nats_per_image": tot["nll_sum"] / max(tot["n_images"], 1)}


# ---------------------------------------------------------------- training

@dataclass
class DecoderTrainConfig:
    """Paper defaults (sec. 4.2/5.2): Adam, lr 1e-3, batch 128; ``decoder`` is a registry name."""
    decoder: str = "conv"
    decoder_config: dict = field(default_factory=dict)   # extra keyword arguments of the decoder class
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderTrainConfig":
        return cls(**d)


def decoder_train_step(decoder: nn.Module, opt: torch.optim.Optimizer, z: torch.Tensor, x: torch.Tensor,
                       levels: int) -> float:
    """One optimiser step on the batch-mean :func:`reconstruction_loss`; returns it (nats/image)."""
    decoder.train()
    opt.zero_grad(set_to_none=True)
    loss = reconstruction_loss(decoder(z), x, levels).mean()
    loss.backward()
    opt.step()
    return loss.item()


# ---------------------------------------------------------------- checkpoints

WEIGHTS, CONFIG = "weights.pt", "decoder.json"


def decoder_files(decoder: nn.Module, name: str, z_dim: int, image_shape, levels: int,
                  config: dict | None = None) -> dict[str, bytes]:
    """A decoder checkpoint: weights as a plain state dict of tensors, how to rebuild it as JSON."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in decoder.state_dict().items()}, buf)
    spec = {"arch": name, "z_dim": int(z_dim), "image_shape": [int(v) for v in image_shape],
            "levels": int(levels), "config": config or {}}
    return {WEIGHTS: buf.getvalue(), CONFIG: json.dumps(spec, indent=2).encode()}


def decoder_from_files(files: dict[str, bytes], where: str = "checkpoint", map_location="cpu") -> nn.Module:
    """Rebuild a decoder from :func:`decoder_files`; never unpickles code (``weights_only=True``). Eval mode."""
    try:
        spec = json.loads(files[CONFIG])
        name, args = spec["arch"], (spec["z_dim"], spec["image_shape"], spec["levels"])
        config = spec.get("config", {})
    except KeyError as e:
        raise FisherError(f"{where}/{CONFIG}: missing or incomplete ({e}); pass a decoder checkpoint directory") from e
    except json.JSONDecodeError as e:
        raise FisherError(f"{where}/{CONFIG}: not valid JSON ({e})") from e
    try:
        decoder = build_decoder(name, *args, **config)
    except FisherError as e:
        raise FisherError(f"{where}/{CONFIG}: {e}") from e
    from fisher.checkpoints import load_weights
    return load_weights(decoder, files.get(WEIGHTS), f"{where}/{WEIGHTS}", CONFIG, "retrain the decoder",
                        map_location)


def save_decoder(decoder: nn.Module, directory: str, name: str, z_dim: int, image_shape, levels: int,
                 config: dict | None = None) -> None:
    """Write :func:`decoder_files` into ``directory`` (local path or URI), atomically per file."""
    from fisher.io import atomic_write_bytes, join
    for fname, data in decoder_files(decoder, name, z_dim, image_shape, levels, config).items():
        atomic_write_bytes(join(str(directory), fname), data)


def load_decoder(directory: str, map_location="cpu") -> nn.Module:
    """Load a decoder saved by :func:`save_decoder` from a local path or URI."""
    from fisher.checkpoints import read_files
    return decoder_from_files(read_files(directory, (WEIGHTS, CONFIG)), str(directory), map_location)


# ---------------------------------------------------------------- fitting on arrays
@torch.no_grad()
def evaluate_decoder(decoder: nn.Module, z: torch.Tensor, x: torch.Tensor, levels: int,
                     batch_size: int = 256) -> dict:
    """Test reconstruction error (see the module docstring) of ``decoder`` on (z, x), in eval mode."""
    decoder.eval()
    parts = [reconstruction_metrics(decoder(z[i:i + batch_size]), x[i:i + batch_size], levels)
             for i in range(0, z.shape[0], batch_size)]
    return summarize_metrics(*parts)


def fit_decoder(cfg: DecoderTrainConfig, z_train: torch.Tensor, x_train: torch.Tensor, z_test: torch.Tensor,
                x_test: torch.Tensor, levels: int, image_shape, on_epoch=None, start: dict | None = None):
    """Train a decoder z → x on in-memory arrays; returns (decoder, last test metrics).

    ``on_epoch(epoch, metrics, decoder, opt)`` is called after every epoch (Ray Tune and Ray Train report
    and checkpoint from it). ``start`` = {"weights": state_dict, "optimizer": state_dict, "epoch": k}
    resumes after epoch k.
    """
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg.decoder, z_train.shape[1], image_shape, levels, **cfg.decoder_config)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    first = 0
    if start:
        decoder.load_state_dict(start["weights"])
        opt.load_state_dict(start["optimizer"])
        first = int(start["epoch"])
    else:
        decoder.fit_input(z_train)
    gen = torch.Generator().manual_seed(cfg.seed)
    metrics = evaluate_decoder(decoder, z_test, x_test, levels) if first >= cfg.epochs else {}
    for epoch in range(first, cfg.epochs):
        order = torch.randperm(z_train.shape[0], generator=gen)
        losses = [decoder_train_step(decoder, opt, z_train[idx], x_train[idx], levels)
                  for idx in order.split(cfg.batch_size)]
        metrics = {"epoch": epoch + 1, "train_nll_nats_per_image": float(np.mean(losses)),
                   **{f"test_{k}": v for k, v in evaluate_decoder(decoder, z_test, x_test, levels).items()}}
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, decoder, opt)
    return decoder, metrics
