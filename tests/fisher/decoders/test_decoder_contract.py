"""The decoder contract (fisher.decoders.base), checked for every registered decoder on tiny configs."""
import math

import pytest
import torch

from fisher.errors import FisherError
from fisher.decoders import (DECODERS, build_decoder, decoder_files, decoder_from_files, evaluate_decoder,
                             load_decoder, save_decoder, shuffled_z_metrics)

# Every registered decoder needs a tiny config and an image format it supports (a new family adds its line).
TINY = {
    "conv": ({"base_channels": 8}, (8, 8, 1), 2),
    "celeba_conv": ({"channels": 8}, (8, 8, 3), 4),
    "pixels": ({}, (2, 3, 1), 2),                 # the identity: z_dim = H·W·C = 6
    "realnvp": ({"features": 4, "blocks": 1}, (8, 8, 3), 4),
    "pixelcnn": ({"layers": 2, "filters": 6, "kernel": 3}, (6, 6, 3), 4),
    "wgan": ({"width": 4, "noise_dim": 8, "n_critic": 2}, (8, 8, 3), 4),
    "latent": ({"model": "pixelvae", "model_config": {"channels": 1, "levels": 2, "latent_dim": 6, "pixel_layers": 1,
                                                      "filters": 4, "kernel": 3, "height": 6, "width": 6}},
               (6, 6, 1), 2),             # a PixelVAE's own decoder (test_realnvp_prior.py: RealNVP's f⁻¹)
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_decoder_has_a_tiny_config():
    assert set(DECODERS.names()) <= set(TINY), f"add a tiny config for {set(DECODERS.names()) - set(TINY)}"


def _decoder(name, z_dim=6):
    config, shape, levels = TINY[name]
    torch.manual_seed(0)
    return build_decoder(name, z_dim, shape, levels, **config), shape, levels


def _images(shape, levels, n=4):
    h, w, c = shape
    return torch.randint(0, levels, (n, c, h, w), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(TINY))
def test_contract(name):
    dec, shape, levels = _decoder(name)
    h, w, c = shape
    z, x = torch.randn(4, 6), _images(shape, levels)
    dec.fit_input(z)
    dec.eval()
    with torch.no_grad():
        gen = dec.generate(z, torch.Generator().manual_seed(0))
        sample = dec.sample(z, torch.Generator().manual_seed(0))
    assert gen.shape == (4, c, h, w) and gen.dtype.is_floating_point and 0 <= float(gen.min()) <= float(gen.max()) <= 1
    assert sample.shape == (4, c, h, w) and not sample.dtype.is_floating_point
    assert 0 <= int(sample.min()) and int(sample.max()) < levels
    assert dec.generates in ("mean", "sample")
    if dec.has_likelihood:
        loss = dec.loss(z, x)
        assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
        m = evaluate_decoder(dec, z, x)
        assert m["nll_nats_per_image"] == pytest.approx(float(loss.mean()), rel=1e-5)
        shuffled = shuffled_z_metrics(dec, z, x)["test_nll_shuffled_z_nats_per_image"]
        assert shuffled == pytest.approx(float(dec.loss(z.roll(1, 0), x).mean()), rel=1e-5)
    else:                                   # no likelihood: no NLL, the squared error of generate
        m = evaluate_decoder(dec, z, x)
        assert m["nll_nats_per_image"] is None and m["bce_nats_per_pixel"] is None and 0 <= m["mse"] <= 1
        assert shuffled_z_metrics(dec, z, x) == {}


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_step_lowers_the_loss(name):
    dec, shape, levels = _decoder(name)
    if not dec.trainable:                               # nothing to train: fit_decoder takes no step
        with pytest.raises(FisherError, match="nothing to train"):
            dec.train_step(None, torch.randn(2, 6), _images(shape, levels, 2))
        return
    z, x = torch.randn(8, 6), _images(shape, levels, 8)
    dec.fit_input(z)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in dec.parameters()]
    losses = [dec.train_step(opt, z, x)["loss"] for _ in range(25)]
    assert all(map(math.isfinite, losses)) and not all(map(torch.equal, before, dec.parameters()))
    if dec.has_likelihood:              # an adversarial loss need not fall (test_wgan.py checks its training)
        assert losses[-1] < losses[0], losses[::5]


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpoint_round_trip(name, tmp_path):
    dec, shape, levels = _decoder(name)
    z = torch.randn(3, 6)
    if dec.trainable:
        opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
        dec.train_step(opt, z, _images(shape, levels, 3))      # moves weights and BN running stats
    dec.eval()
    again = decoder_from_files(decoder_files(dec))
    assert type(again) is type(dec) and again.config == dec.config
    with torch.no_grad():
        assert torch.equal(dec.generate(z), again.generate(z))
        save_decoder(dec, tmp_path / "d")
        assert torch.equal(dec.generate(z), load_decoder(tmp_path / "d").generate(z))
