"""Fitting a decoder z → x (paper sec. 5.1/5.2: Adam, lr 1e-3, batch 128) and its test metrics.

Reconstruction error on the test split, from :meth:`Decoder.reconstruction_metrics` batch sums
(so averages over many batches are exact), by :func:`summarize_metrics`:

* ``bce_nats_per_pixel`` = nll_sum / n_subpixels: the mean per-sub-pixel NLL in nats (binary or
  categorical cross-entropy);
* ``mse`` = se_sum / n_subpixels: the mean of (E[x̂] - x/(levels-1))² on the [0, 1] scale;
* ``nll_nats_per_image`` = nll_sum / n_images;
* after the last epoch, ``nll_shuffled_z_nats_per_image``: the same with each image given another
  image's z (:func:`shuffled_z_metrics`), what the embedding is worth to the decoder.

Pure PyTorch: every trainer (Ray Train's ``train-decoder``, Ray Tune's sweep cells, a notebook)
calls :func:`fit_decoder`; :func:`train_on_pairs` is the whole job from artifact directories.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.likelihoods import likelihood_for


@dataclass
class DecoderTrainConfig:
    """Paper defaults (sec. 5.1/5.2): Adam, lr 1e-3, batch 128; ``decoder`` is a registry name and
    ``decoder_config`` that decoder's options; ``lr`` None: the decoder's ``default_lr``."""
    decoder: str = "conv"
    decoder_config: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderTrainConfig":
        return cls(**d)


# ---------------------------------------------------------------- metrics on head parameters

def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-image -log p(x | z) in nats, Tensor[B], of head parameters ``logits``."""
    return likelihood_for(levels).nll(logits, x).flatten(1).sum(1)


def decode_mean(logits: torch.Tensor, levels: int) -> torch.Tensor:
    """Expected image E[x̂] on [0, 1], float (B, C, H, W)."""
    return likelihood_for(levels).mean(logits)


def decode_mode(logits: torch.Tensor, levels: int) -> torch.Tensor:
    """Most likely integer image in [0, levels), long (B, C, H, W)."""
    return likelihood_for(levels).mode(logits)


@torch.no_grad()
def reconstruction_metrics(logits: torch.Tensor, x: torch.Tensor, levels: int) -> dict:
    """Batch sums ``nll_sum``, ``se_sum``, ``n_subpixels``, ``n_images`` of head parameters ``logits``."""
    head = likelihood_for(levels)
    nll = head.nll(logits, x)
    se = (head.mean(logits) - x.to(logits.dtype) / (levels - 1)).square()
    return {"nll_sum": float(nll.double().sum()), "se_sum": float(se.double().sum()),
            "n_subpixels": x.numel(), "n_images": x.shape[0]}


def summarize_metrics(*parts: dict) -> dict:
    """Sum metric dicts and give ``bce_nats_per_pixel``, ``mse``, ``nll_nats_per_image``."""
    tot = {k: sum(p[k] for p in parts) for k in ("nll_sum", "se_sum", "n_subpixels", "n_images")}
    n = max(tot["n_subpixels"], 1)
    nll = None if math.isnan(tot["nll_sum"]) else tot["nll_sum"]     # None: a decoder without a likelihood
    return {"bce_nats_per_pixel": None if nll is None else nll / n, "mse": tot["se_sum"] / n,
            "nll_nats_per_image": None if nll is None else nll / max(tot["n_images"], 1)}


# ---------------------------------------------------------------- training

def decoder_train_step(decoder: Decoder, opt: torch.optim.Optimizer, z: torch.Tensor, x: torch.Tensor,
                       levels: int | None = None) -> float:
    """One optimiser step of ``decoder`` (its own :meth:`Decoder.train_step`); returns the loss."""
    return decoder.train_step(opt, z, x)["loss"]


@torch.no_grad()
def evaluate_decoder(decoder: Decoder, z: torch.Tensor, x: torch.Tensor, levels: int | None = None,
                     batch_size: int = 256) -> dict:
    """Test reconstruction error (module docstring) of ``decoder`` on (z, x), in eval mode."""
    decoder.eval()
    parts = [decoder.reconstruction_metrics(z[i:i + batch_size], x[i:i + batch_size])
             for i in range(0, z.shape[0], batch_size)]
    return summarize_metrics(*parts)


@torch.no_grad()
def shuffled_z_metrics(decoder: Decoder, z: torch.Tensor, x: torch.Tensor) -> dict:
    """How much a decoder with a likelihood uses its input: the test NLL with every image given the
    embedding of the next test image (``z`` rolled by one row), ``test_nll_shuffled_z_nats_per_image``.
    Its excess over the NLL given the image's own z is what z is worth to the decoder, in nats per
    image; near 0, the decoder is a model of the images alone and its decodings, interpolations and
    FIDs cannot tell embeddings apart. Empty for a decoder without a likelihood or a single image."""
    if not decoder.has_likelihood or z.shape[0] < 2:
        return {}
    return {"test_nll_shuffled_z_nats_per_image": evaluate_decoder(decoder, z.roll(1, 0), x)["nll_nats_per_image"]}


def z_gain(metrics: dict) -> float | None:
    """What the embedding is worth to a decoder, in nats per sub-pixel, from its test metrics: the NLL given
    another image's z (:func:`shuffled_z_metrics`) minus the NLL given its own; None where not measured."""
    shuffled, own, per = (metrics.get(k) for k in ("test_nll_shuffled_z_nats_per_image", "test_nll_nats_per_image",
                                                    "test_bce_nats_per_pixel"))
    if shuffled is None or own is None or not per:
        return None
    return (shuffled - own) * per / own          # nats per image / (sub-pixels per image)


def fit_decoder(cfg: DecoderTrainConfig, z_train: torch.Tensor, x_train: torch.Tensor, z_test: torch.Tensor,
                x_test: torch.Tensor, levels: int, image_shape, on_epoch=None, start: dict | None = None,
                prepare=None):
    """Train a decoder z → x on in-memory arrays; returns (decoder, last test metrics).

    ``on_epoch(epoch, metrics, decoder, opt)`` is called after every epoch (Ray Tune and Ray Train report
    and checkpoint from it). ``start`` = {"weights": state_dict, "optimizer": state_dict, "epoch": k}
    (:func:`fisher.checkpoints.read_train_state`) resumes after epoch k. ``prepare(decoder)`` is called
    on the new decoder first (a latent model's decoder gets the model's weights).
    """
    from fisher.decoders import build_decoder
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg.decoder, z_train.shape[1], image_shape, levels, **cfg.decoder_config)
    if prepare is not None:
        prepare(decoder)
    decoder.to(z_train.device)
    if not decoder.trainable:          # the identity of the pixel baseline: one evaluation, no epochs
        decoder.fit_input(z_train)
        metrics = {"epoch": 0, "train_nll_nats_per_image": None,
                   **{f"test_{k}": v for k, v in evaluate_decoder(decoder, z_test, x_test).items()}}
        if on_epoch is not None:
            on_epoch(0, metrics, decoder, None)
        return decoder, metrics
    opt = decoder.make_optimizer(cfg.lr)
    first = 0
    if start:
        decoder.load_state_dict(start["weights"])
        if start.get("optimizer") is not None:
            opt.load_state_dict(start["optimizer"])
        first = int(start["epoch"])
    else:
        decoder.fit_input(z_train)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(first):                 # a resumed run shuffles its remaining epochs as an undisturbed one
        torch.randperm(z_train.shape[0], generator=gen)
    metrics = evaluate_decoder(decoder, z_test, x_test) if first >= cfg.epochs else {}
    for epoch in range(first, cfg.epochs):
        order = torch.randperm(z_train.shape[0], generator=gen).to(z_train.device)
        losses = [decoder.train_step(opt, z_train[idx], x_train[idx])["loss"] for idx in order.split(cfg.batch_size)]
        train_key = "train_nll_nats_per_image" if decoder.has_likelihood else "train_loss"   # a GAN: its critic's
        metrics = {"epoch": epoch + 1, train_key: float(np.mean(losses)),
                   **{f"test_{k}": v for k, v in evaluate_decoder(decoder, z_test, x_test).items()}}
        if epoch + 1 == cfg.epochs:
            metrics.update(shuffled_z_metrics(decoder, z_test, x_test))
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, decoder, opt)
    return decoder, metrics


def load_split_tensors(embeddings: str, data: str, column: str, device="cpu", splits=("train", "test")) -> dict:
    """{split: (z float32 (N, dim), x long (N, C, H, W))}: one embedding column joined to its images by id."""
    from fisher.embedding import load_pairs
    from fisher.priors import to_model_input
    out = {}
    for split in splits:
        pairs = load_pairs(embeddings, data, split, column)
        out[split] = (torch.from_numpy(np.ascontiguousarray(pairs["z"])).to(device),
                      to_model_input(pairs["image"], device))
    return out
