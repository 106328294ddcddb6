"""Decoders z → x (paper sec. 4.2, appendix 7.2), one module per family.

* :func:`build_decoder` — ``build_decoder("conv", z_dim, (H, W, C), levels, **config)``;
* :func:`load_decoder` / :func:`save_decoder` — checkpoints (:mod:`fisher.checkpoints`);
* :data:`DECODERS` — the registry (``DECODERS.names()``); :func:`register_decoder` adds one;
* :class:`Decoder` — the behavioural contract (:mod:`fisher.decoders.base`);
* :mod:`fisher.decoders.training` — :func:`fit_decoder` and the reconstruction metrics.

Importing this package registers every family in it.
"""
from __future__ import annotations

from fisher import checkpoints
from fisher.checkpoints import SPEC as CONFIG, WEIGHTS  # noqa: F401
from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.decoders import conv as _conv  # noqa: F401  (registers "conv", "celeba_conv")
from fisher.decoders import pixels as _pixels  # noqa: F401  (registers "pixels")
from fisher.decoders import realnvp as _realnvp  # noqa: F401  (registers "realnvp")
from fisher.decoders import pixelcnn as _pixelcnn  # noqa: F401  (registers "pixelcnn")
from fisher.decoders import wgan as _wgan  # noqa: F401  (registers "wgan")
from fisher.decoders import latent as _latent  # noqa: F401  (registers "latent")
from fisher.decoders.conv import CelebAConvDecoder, ConvDecoder, ResBlock  # noqa: F401
from fisher.decoders.training import (DecoderTrainConfig, decode_mean, decode_mode, decoder_train_step,  # noqa: F401
                                      evaluate_decoder, fit_decoder, load_split_tensors, reconstruction_loss,
                                      reconstruction_metrics, shuffled_z_metrics, summarize_metrics,
                                      z_gain)
from fisher.errors import FisherError


def register_decoder(name: str, config: type | None = None):
    """Class decorator adding a :class:`Decoder` subclass to :data:`DECODERS` under ``name``."""
    return DECODERS.register(name, config)


def build_decoder(name: str, z_dim: int, image_shape, levels: int, **config) -> Decoder:
    """Instantiate registered decoder ``name`` for embeddings of size ``z_dim`` and images (H, W, C)."""
    DECODERS.get(name)
    h, w, c = (int(v) for v in image_shape)
    if z_dim < 1 or levels < 2 or min(h, w, c) < 1:
        raise FisherError(f"decoder {name!r}: invalid z_dim={z_dim}, image_shape={tuple(image_shape)} "
                          f"or levels={levels}; need z_dim >= 1, levels >= 2 and positive sizes")
    decoder = DECODERS.build(name, int(z_dim), (h, w, c), int(levels), **config)
    decoder.bind((h, w, c), int(levels))
    return decoder


def decoder_files(decoder: Decoder) -> dict[str, bytes]:
    """A decoder checkpoint: weights as a plain state dict of tensors, how to rebuild it as JSON."""
    return checkpoints.module_files(decoder, "decoder")


def decoder_from_files(files: dict[str, bytes], where: str = "checkpoint", map_location="cpu") -> Decoder:
    """Rebuild a decoder from :func:`decoder_files`; never unpickles code (``weights_only=True``). Eval mode."""
    return checkpoints.module_from_files(files, "decoder", where, map_location)


def save_decoder(decoder: Decoder, directory) -> None:
    checkpoints.save_module(decoder, "decoder", directory)


def load_decoder(directory, map_location="cpu") -> Decoder:
    """Load a decoder saved by :func:`save_decoder` (or an older ``decoder.json`` checkpoint)."""
    return checkpoints.load_module(directory, "decoder", map_location)


from fisher.registry import load_plugins as _load_plugins  # noqa: E402

_load_plugins()
