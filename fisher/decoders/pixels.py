"""The decoder of the pixel-space baseline (paper sec. 5.2's comparison with interpolation in pixels).

With the embedding kind ``pixel`` (:mod:`fisher.embedding`) z is the image itself on [0, 1],
flattened in (C, H, W) order: for MNIST the grey original by default (what a decoder's mean
estimates, and what FID compares with), else the image as prepared. Decoding is the identity, so
the paper's (1 - α) z₁ + α z₂ becomes the cross-fade (1 - α) x₁ + α x₂ of the two images
(:func:`fisher.baselines.pixel_interpolations`) and interpolation, FID, KID and the probes measure
the row every learned embedding should beat half-way through an interpolation.

It has no parameters, no likelihood (``has_likelihood = False``: its reconstruction NLL is
undefined; its MSE against the prepared image is 0, or for MNIST's grey originals the distance between
grey and binarized images) and no input standardization; ``fisher train-decoder --decoder pixels``
writes it without an optimisation step.
"""
from __future__ import annotations

import torch

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError


@DECODERS.register("pixels")
class PixelDecoder(Decoder):
    """z (B, C·H·W) on [0, 1] → the image (B, C, H, W): the identity."""
    has_likelihood = False
    trainable = False

    def __init__(self, z_dim: int, image_shape=None, levels: int | None = None):
        super().__init__(z_dim, image_shape, levels)
        if image_shape is not None:
            h, w, c = (int(v) for v in image_shape)
            if z_dim != h * w * c:
                raise FisherError(f"decoder 'pixels': z_dim {z_dim} is not the {h}×{w}×{c} = {h * w * c} "
                                  "sub-pixels of the images; it decodes `fisher embed --kind pixel` embeddings")

    def fit_input(self, z: torch.Tensor) -> None:
        """No standardization: z is already the image."""

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        h, w, c = self.image_shape
        return z.reshape(len(z), c, h, w).clamp(0, 1)

    def generate(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean(z)

    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (self.mean(z) * (self.levels - 1)).round().long()

    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise FisherError("decoder 'pixels' has no likelihood to train; it is the identity")

    def train_step(self, opt, z, x) -> dict:
        raise FisherError("decoder 'pixels' has nothing to train; it is the identity")
