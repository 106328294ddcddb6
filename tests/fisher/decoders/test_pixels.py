"""The pixel-space baseline: embedding kind ``pixel`` + decoder ``pixels`` decode interpolations to the
cross-fade (1 - α) x₁ + α x₂ of :func:`fisher.baselines.pixel_interpolations`, exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fisher.baselines import pixel_interpolations
from fisher.decoders import build_decoder, fit_decoder
from fisher.decoders.training import DecoderTrainConfig
from fisher.embedding import Embedder, EmbedSpec
from fisher.errors import FisherError
from fisher.evaluation import decode_interpolations
from fisher.manipulation import random_pairs


@pytest.mark.parametrize("shape, levels", [((6, 5, 1), 2), ((4, 4, 3), 32)])
def test_decoded_pixel_interpolations_are_the_cross_fade(shape, levels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, levels, size=(10, *shape), dtype=np.uint8)
    emb = Embedder(None, "pixel", [EmbedSpec(1024, 0.5)], shape, levels=levels)   # dim/density unused
    z = emb(images)["z"]
    assert z.shape == (10, int(np.prod(shape))) and emb.describe()["columns"]["z"]["dim"] == z.shape[1]
    decoder = build_decoder("pixels", z.shape[1], shape, levels)
    assert list(decoder.parameters()) == []
    pairs, alphas = random_pairs(10, 7, seed=3), [0.0, 0.25, 0.5, 1.0]
    got = decode_interpolations(decoder, torch.from_numpy(z), pairs, alphas, levels).numpy()
    want = pixel_interpolations(images[pairs[:, 0]], images[pairs[:, 1]], alphas, levels)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(got[:, 0] * (levels - 1), images[pairs[:, 0]].transpose(0, 3, 1, 2))


def test_pixel_decoder_is_fitted_without_training():
    shape, levels = (4, 4, 1), 2
    x = torch.randint(0, 2, (8, 1, 4, 4))
    z = x.flatten(1).float()          # levels 2: the image on [0, 1] is the image
    cfg = DecoderTrainConfig(decoder="pixels", epochs=5)
    seen = []
    decoder, metrics = fit_decoder(cfg, z, x, z, x, levels, shape, on_epoch=lambda e, m, d, o: seen.append(e))
    assert seen == [0] and metrics["test_mse"] == 0.0 and metrics["test_bce_nats_per_pixel"] is None
    with pytest.raises(FisherError, match="nothing to train"):
        decoder.train_step(None, z, x)


def test_pixel_decoder_refuses_a_projected_embedding():
    with pytest.raises(FisherError, match="4×4×1 = 16 sub-pixels"):
        build_decoder("pixels", 15, (4, 4, 1), 2)


def test_embedding_kinds_that_need_a_prior_refuse_none():
    with pytest.raises(ValueError, match="needs a prior"):
        Embedder(None, "fisher", [EmbedSpec(8, 1.0)], (4, 4, 1))
    with pytest.raises(ValueError, match="needs the images' levels"):
        Embedder(None, "pixel", [EmbedSpec(8, 1.0)], (4, 4, 1))
