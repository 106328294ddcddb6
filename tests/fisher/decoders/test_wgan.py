"""The conditional WGAN-GP decoder: the gradient penalty, the critic/generator step schedule, conditioning,
reproducible decoding, padding of odd sizes, training toward the data."""
import pytest
import torch

from fisher.decoders import build_decoder, decoder_files, decoder_from_files
from fisher.decoders.wgan import WGANConfig, _side
from fisher.errors import FisherError
from fisher.footprint import training_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _gan(shape=(8, 8, 1), levels=4, z_dim=3, seed=0, **config):
    torch.manual_seed(seed)
    dec = build_decoder("wgan", z_dim, shape, levels, **{"width": 4, "noise_dim": 5, **config})
    dec.fit_input(torch.randn(16, z_dim))
    return dec


def test_sizes_and_architecture():
    assert [_side(s, s) for s in (2, 8, 28, 32, 64, 128)] == [(8, 1), (8, 1), (32, 3), (32, 3), (64, 4), (128, 5)]
    dec = build_decoder("wgan", 3, (128, 128, 3), 32)                              # the defaults: dim 64
    widths = [m.out_channels for m in dec.generator.net if isinstance(m, torch.nn.ConvTranspose2d)]
    assert widths == [512, 512, 256, 128, 64, 3]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dec.critic.modules())
    assert [c.out_features for c in dec.critic.cond] == [3, 64, 128, 256, 512, 512]


def test_gradient_penalty_is_the_critics_gradient_norm():
    """With real = fake the interpolate is that image whatever ε: the penalty is (‖∂D/∂x‖ - 1)², checked
    against central differences, on a 6 × 6 image (padded to 8 × 8: the border is not differentiated)."""
    dec = _gan(shape=(6, 6, 2)).double()
    h, x = torch.randn(1, 3, dtype=torch.float64), torch.rand(1, 2, 6, 6, dtype=torch.float64) * 2 - 1
    _, _, gp = dec.critic_terms(h, x, x)
    grad = torch.zeros(x.numel(), dtype=torch.float64)
    with torch.no_grad():
        for i in range(x.numel()):
            step = torch.zeros(x.numel(), dtype=torch.float64)
            step[i] = 1e-6
            grad[i] = (dec.critic(h, x + step.view_as(x)) - dec.critic(h, x - step.view_as(x))) / 2e-6
    assert gp.item() == pytest.approx(float((grad.norm() - 1) ** 2), rel=1e-6)
    assert abs(float(grad.norm()) - 1) > 0.1                                          # a real test
    gp.sum().backward()                                                               # create_graph: trains D
    assert dec.critic.layers[0][0].weight.grad.abs().sum() > 0


def test_gradient_penalty_of_a_linear_critic():
    """D(h, x) = <w, x>: the gradient is w at every interpolate, so the penalty is (‖w‖ - 1)²."""
    dec = _gan()
    w = torch.randn(1, 1, 8, 8)

    class Linear(torch.nn.Module):
        def forward(self, h, x):
            return (w * x).flatten(1).sum(1)

    dec.critic = Linear()
    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    d_real, d_fake, gp = dec.critic_terms(torch.randn(4, 3), real, fake)
    assert torch.allclose(gp, (w.norm() - 1).square().expand(4))
    assert torch.allclose(d_real - d_fake, (w * (real - fake)).flatten(1).sum(1), atol=1e-5)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


def test_steps_update_their_own_network_every_n_critic():
    dec = _gan(n_critic=3)
    z, x = torch.randn(4, 3), torch.randint(0, 4, (4, 1, 8, 8))
    opt = dec.make_optimizer()
    assert opt.defaults["betas"] == (0.5, 0.9) and opt.defaults["lr"] == 2e-4
    for call in (1, 2):
        g, d = _params(dec.generator), _params(dec.critic)
        out = dec.train_step(opt, z, x)
        assert _same(g, _params(dec.generator)) and not _same(d, _params(dec.critic)), call
    assert set(out) == {"loss", "wasserstein"}
    g = _params(dec.generator)
    dec.train_step(opt, z, x)                                                         # the 3rd: G steps too
    assert not _same(g, _params(dec.generator)) and int(dec.critic_steps) == 3
    steps = lambda module: {int(opt.state[p]["step"]) for p in module.parameters()}
    assert steps(dec.critic) == {3} and steps(dec.generator) == {1}                   # G's step left D alone
    # a resumed run continues the cycle: after 4 calls, the 6th (2nd after resuming) steps G
    dec.train_step(opt, z, x)
    again = _gan(n_critic=3, seed=1)
    again.load_state_dict(dec.state_dict())
    opt2 = again.make_optimizer()
    opt2.load_state_dict(opt.state_dict())
    g = _params(again.generator)
    again.train_step(opt2, z, x)
    assert _same(g, _params(again.generator))
    again.train_step(opt2, z, x)
    assert not _same(g, _params(again.generator)) and int(again.critic_steps) == 6


def test_conditioning_changes_images_and_critic():
    dec = _gan().eval()
    h, noise = torch.randn(2, 3), torch.randn(1, 5).expand(2, -1)
    with torch.no_grad():
        images = dec.generate_images(h, noise)
        assert not torch.allclose(images[0], images[1])
        x = torch.rand(1, 1, 8, 8).expand(2, -1, -1, -1)
        scores = dec.critic(h, x)
        assert abs(float(scores[0] - scores[1])) > 1e-4


def test_sample_is_seeded_per_row_in_eval_mode():
    dec = _gan(levels=5).train()                                                      # BN batch stats unused
    z = torch.randn(6, 3)
    whole = dec.sample(z)
    assert dec.training
    assert torch.equal(dec.sample(z[2:3]), whole[2:3]) and torch.equal(dec.sample(z.flip(0)), whole.flip(0))
    assert whole.dtype == torch.long and 0 <= int(whole.min()) and int(whole.max()) < 5
    assert torch.equal(dec.generate(z), whole.float() / 4)
    assert torch.equal(dec.sample(z, torch.Generator().manual_seed(1)), dec.sample(z, torch.Generator().manual_seed(1)))
    other = _gan(levels=5, sample_seed=1)
    other.load_state_dict(dec.state_dict())
    assert not torch.equal(other.sample(z), whole)
    with pytest.raises(FisherError, match="no mean"):
        dec.mean(z)


def test_mnist_shape_pads_and_crops():
    dec = _gan(shape=(28, 28, 1), levels=2)
    z, x = torch.randn(4, 3), torch.randint(0, 2, (4, 1, 28, 28))
    assert dec.critic.pad == (2, 2, 2, 2)
    assert dec.generator(torch.randn(4, 3), torch.randn(4, 5)).shape == (4, 1, 32, 32)
    assert dec.sample(z).shape == (4, 1, 28, 28) and int(dec.sample(z).max()) <= 1
    loss = dec.loss(z, x)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    out = dec.train_step(dec.make_optimizer(), z, x)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    h, real = dec.standardize(z[:1]), dec._real(x[:1])
    padded = torch.full((1, 1, 32, 32), -1.0)                                         # black, as the data's
    padded[:, :, 2:30, 2:30] = real
    with torch.no_grad():
        for cond, layer in zip(dec.critic.cond, dec.critic.layers):
            padded = layer(padded + cond(h)[:, :, None, None])
        assert torch.allclose(dec.critic(h, real), padded.flatten())
        noise = torch.randn(1, 5)
        assert torch.equal(dec.generate_images(h, noise), dec.generator(h, noise)[:, :, 2:30, 2:30])


def test_training_moves_the_generator_to_the_data():
    """All-white data: the critic learns to prefer white, and the generator follows."""
    dec = _gan(n_critic=2, width=8, noise_dim=8)
    z, x = torch.randn(16, 3), torch.full((16, 1, 8, 8), 3)
    opt = dec.make_optimizer(2e-3)
    before = float(dec.eval().generate(z).mean())
    for _ in range(200):
        dec.train_step(opt, z, x)
    after = float(dec.eval().generate(z).mean())
    assert after > 0.9 and after > before + 0.25, (before, after)


def test_non_finite_loss_and_bad_checkpoint_are_refused():
    dec = _gan()
    with torch.no_grad():
        dec.critic.layers[-1].weight.fill_(float("nan"))
    with pytest.raises(FisherError, match="lower --lr"):
        dec.train_step(dec.make_optimizer(), torch.randn(2, 3), torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(FisherError, match="NaN or Inf"):
        decoder_from_files(decoder_files(dec))


def test_memory_estimate_runs_the_critic_loss():
    build = lambda: build_decoder("wgan", 3, (28, 28, 1), 2, width=4, noise_dim=5)
    need = training_bytes(build, lambda m, n: m.loss(torch.zeros(n, 3), torch.zeros(n, 1, 28, 28, dtype=torch.long)), 8)
    assert need > sum(p.numel() * 4 for p in build().parameters())


@pytest.mark.parametrize("field, value", [("noise_dim", 0), ("width", 0), ("n_critic", 0), ("gp_weight", -1.0),
                                          ("gp_weight", float("nan"))])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WGANConfig(**{field: value})
    with pytest.raises(FisherError, match=field):
        build_decoder("wgan", 3, (8, 8, 1), 2, **{field: value})
