"""PixelVAE (Gulrajani et al. 2016): the ELBO is log p(x | z) − KL with the closed-form KL, the
importance-sampled estimate (sec. 4.1) lies above the ELBO and rises with K, decoding by the cached
sampler is what the full network computes, any image size builds, training lowers the loss."""
import itertools
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fisher.errors import FisherError
from fisher.priors import build_prior
from fisher.priors.gated import inverse_cdf
from fisher.priors.pixelvae import PixelVAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"latent_dim": 3, "pixel_layers": 2, "filters": 8, "kernel": 3}


def _model(hw=8, channels=1, levels=2, seed=0, std=None):
    """A tiny PixelVAE for hw × hw images; ``std``: every weight redrawn with that scale (far from the init,
    so the decoder depends on z strongly and a wrong cache entry shows)."""
    torch.manual_seed(seed)
    m = build_prior("pixelvae", channels=channels, levels=levels, height=hw, width=hw, **TINY).eval()
    if std is not None:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(std * torch.randn_like(p))
    return m


def _images(n=8, hw=8, channels=1, levels=2, seed=1):
    return torch.randint(0, levels, (n, channels, hw, hw), generator=torch.Generator().manual_seed(seed))


def test_the_elbo_is_the_decoder_log_likelihood_minus_the_closed_form_kl():
    m, x = _model(std=0.1), _images()
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    mu, log_sigma = m.posterior(x)
    z = mu + log_sigma.exp() * torch.randn_like(mu)                   # the z forward drew
    kl = kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(out[1], kl, atol=1e-5) and (kl > 0).all()
    elbo = m.log_prob_from_output(out, x)
    assert elbo.shape == (8,) and torch.allclose(elbo, -m.decoder_nll(z, x) - kl, atol=1e-4)


def test_p_x_given_z_sums_to_one():
    m = _model(hw=2, std=0.3)
    xs = torch.tensor(list(itertools.product([0, 1], repeat=4))).view(-1, 1, 2, 2)
    z = torch.randn(1, 3).expand(len(xs), 3)
    with torch.no_grad():
        assert float(torch.logsumexp(-m.decoder_nll(z, xs), 0)) == pytest.approx(0.0, abs=1e-5)


def _broad_posterior(m, log_sigma=1.0):
    """q(z | x) ≈ N(0, e²·I) for every x: far from the true posterior, so the importance weights vary and
    the estimate's gain with K is large."""
    with torch.no_grad():
        out = m.encoder[-1]
        out.weight.mul_(0.1)
        out.bias.zero_()
        out.bias[m.config.latent_dim:] = log_sigma
    return m


def test_importance_sampling_lies_above_the_elbo_and_rises_with_k():
    m, x = _broad_posterior(_model(std=0.1)), _images().repeat(32, 1, 1, 1)    # 256 estimates per K
    torch.manual_seed(0)
    elbo = torch.stack([m.log_prob(x).detach() for _ in range(8)]).mean(0)
    iw = {k: m.importance_log_prob(x, k) for k in (1, 10, 100)}

    def z_score(d):                                                     # mean / standard error of paired differences
        return float(d.mean() / (d.std() / len(d) ** 0.5))
    assert abs(z_score(iw[1] - elbo)) < 4                              # K = 1: the ELBO in expectation
    assert z_score(iw[10] - iw[1]) > 3 and z_score(iw[100] - iw[10]) > 3, {k: float(v.mean()) for k, v in iw.items()}
    assert (iw[100] > elbo).all()


def test_importance_sampling_is_the_estimate_and_the_chunk_changes_nothing():
    m, x = _broad_posterior(_model(std=0.1)), _images(3)
    torch.manual_seed(5)
    a = m.importance_log_prob(x, 7, chunk=4)
    torch.manual_seed(5)
    eps = torch.randn(7, 3, 3)                                          # (K, B, latent_dim), drawn up front
    mu, log_sigma = m.posterior(x)
    q = Normal(mu.expand(7, 3, 3), log_sigma.exp().expand(7, 3, 3))
    z = q.loc + q.scale * eps
    log_w = (-m.decoder_nll(z.flatten(0, 1), x.repeat(7, 1, 1, 1)).view(7, 3)
             + (Normal(0.0, 1.0).log_prob(z) - q.log_prob(z)).sum(2))
    assert torch.allclose(a, torch.logsumexp(log_w, 0) - math.log(7), atol=1e-4)
    torch.manual_seed(5)
    assert torch.allclose(a, m.importance_log_prob(x, 7, chunk=1000), atol=1e-4)
    assert m.training is False and a.shape == (3,)


@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 4)])
def test_decode_equals_the_full_network_per_sub_pixel(channels, levels):
    m = _model(hw=5, channels=channels, levels=levels, std=0.3)
    z = torch.randn(4, 3)
    u = torch.rand(4, channels, 5, 5, generator=torch.Generator().manual_seed(2))
    naive, s = torch.zeros(4, channels, 5, 5, dtype=torch.long), m.conditioning(z)
    with torch.no_grad():
        for i, j, k in itertools.product(range(5), range(5), range(channels)):
            naive[:, k, i, j] = inverse_cdf(m.likelihood, m.pixelcnn(naive, s), u)[:, k, i, j]
    decoded = m.decode(z, u)
    assert decoded.dtype == torch.long and torch.equal(decoded, naive) and len(decoded.unique()) == levels
    assert not torch.equal(decoded, m.decode(torch.randn(4, 3), u))     # z matters


@pytest.mark.parametrize("hw", [12, 28, 7])
def test_encode_is_deterministic_and_any_size_builds(hw):
    m, x = _model(hw=hw), _images(3, hw)
    code = m.encode(x)
    assert code.shape == (3, m.latent_size((hw, hw, 1))) == (3, 3) and torch.equal(code, m.encode(x))
    assert m.conditioning(code).shape == (3, 32, hw, hw)
    params, kl = m(x)
    assert params.shape == x.shape and kl.shape == (3,)
    assert m.decode(code, torch.rand(3, 1, hw, hw)).shape == x.shape
    with pytest.raises(FisherError, match=f"built for {hw}x{hw}"):
        m.encode(_images(1, hw + 2))


def test_adam_lowers_the_loss():
    m = _model().train()
    x = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
         < torch.linspace(0.05, 0.95, 64).view(1, 1, 8, 8)).long()       # structure to learn: p(x) varies by pixel
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def loss():
        torch.manual_seed(0)                                           # the same ε: compare like with like
        return -m.log_prob(x).mean()

    before = float(loss().detach())
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.9 * before


def test_rgb_builds_and_gives_a_finite_elbo():
    m, x = _model(channels=3, levels=32), _images(2, channels=3, levels=32)
    params, kl = m(x)
    assert params.shape == (2, 3, 32, 8, 8)
    elbo = m.log_prob_from_output((params, kl), x)
    assert torch.isfinite(elbo).all() and (elbo < 0).all()


def test_config_is_checked():
    assert (PixelVAEConfig().latent_dim, PixelVAEConfig().filters, PixelVAEConfig().kernel) == (16, 32, 5)
    for bad in ({"kernel": 4}, {"latent_dim": 0}, {"levels": 1}, {"filters": 2, "channels": 3}):
        with pytest.raises(ValueError):
            PixelVAEConfig(**bad)
        with pytest.raises(FisherError, match="pixelvae"):
            build_prior("pixelvae", **bad)
