"""The prior contract (fisher.priors.base), checked for every registered prior on tiny configs:
shapes, exact normalisation, causality, baseline activations, checkpoint round trip, exact scores."""
import itertools

import pytest
import torch

from fisher.priors import PRIORS, build_prior, load_prior, prior_files, prior_from_files, save_prior
from fisher.scores import activations, fisher_scores, fisher_scores_reference, n_features

# Every registered prior needs a tiny config here (a new family adds its line): (binary, RGB 3-level).
TINY = {
    "pixelcnn": {"n_layers": 2, "filters": 6, "kernel_size": 3},
    "gated": {"n_layers": 2, "filters": 6, "kernel_size": 3},
    "pyramid": {"factors": [], "filters": 6, "nr_resnet": 1, "stages": 1, "components": 2, "dropout": 0.0, "cond_layers": 0},
    "pixelvae": {"latent_dim": 2, "pixel_layers": 2, "filters": 6, "kernel": 3},
    "realnvp": {"scales": 0, "blocks": 1, "features": 4},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_prior_has_a_tiny_config():
    assert set(PRIORS.names()) <= set(TINY), f"add a tiny config for {set(PRIORS.names()) - set(TINY)}"


def _prior(name, channels=1, levels=2, seed=0, hw=(4, 4)):
    """A family built for one image size (its config has height and width: pixelvae) is built for ``hw``."""
    torch.manual_seed(seed)
    sized = {"height", "width"} <= {f.name for f in PRIORS.get(name).fields()}
    size = dict(zip(("height", "width"), hw)) if sized else {}
    return build_prior(name, channels=channels, levels=levels, **TINY[name], **size).eval()


def _exact_only(name):
    """Skip the checks of an exact likelihood (normalisation, causality, activations, Fisher scores) for a
    prior whose log_prob is a bound (a latent-variable model: pixelvae)."""
    if not PRIORS[name].exact_likelihood:
        pytest.skip(f"{name}: log_prob is a bound ({PRIORS[name].bound}), not an exact likelihood")


def _log_prob(m, x):
    """log_prob with the global RNG seeded: the same draws for a stochastic bound (the ELBO)."""
    torch.manual_seed(0)
    return m.log_prob(x)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("channels, levels, h, w", [(1, 2, 3, 3), (3, 3, 1, 2)])
def test_normalises_over_every_image(name, channels, levels, h, w):
    """Σ_x p(x) = 1 over all levels^(C·H·W) images: an exact likelihood."""
    _exact_only(name)
    m = _prior(name, channels, levels)
    xs = torch.tensor(list(itertools.product(range(levels), repeat=channels * h * w))).view(-1, channels, h, w)
    lp = m.log_prob(xs)
    assert lp.shape == (len(xs),) and torch.isfinite(lp).all()
    assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 4)])
def test_causal(name, channels, levels):
    """log p(x_i | x_<i) does not change when any sub-pixel j > i (raster, then R→G→B) changes, and the
    conditional at i is a distribution over x_i (its values' probabilities sum to 1)."""
    _exact_only(name)
    m = _prior(name, channels, levels)
    h = w = 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, levels, (1, channels, h, w), generator=gen)
    order = [(c, y, xx) for y in range(h) for xx in range(w) for c in range(channels)]

    def terms(img):
        return m.likelihood.log_prob(m(img), img)[0]

    base = terms(x)
    depends_on_earlier = False
    for k, (c, y, xx) in enumerate(order):
        later = x.clone()
        for cc, yy, xxx in order[k + 1:]:
            later[0, cc, yy, xxx] = torch.randint(0, levels, (1,), generator=gen)
        assert torch.allclose(terms(later)[c, y, xx], base[c, y, xx], atol=1e-6), (c, y, xx)
        values = x.repeat(levels, 1, 1, 1)
        values[:, c, y, xx] = torch.arange(levels)
        assert float(torch.logsumexp(terms_batch(m, values)[:, c, y, xx], 0)) == pytest.approx(0.0, abs=1e-5)
        if k > 0 and not depends_on_earlier:
            earlier = x.clone()
            pc, py, px = order[k - 1]
            earlier[0, pc, py, px] = (earlier[0, pc, py, px] + 1) % levels
            depends_on_earlier = not torch.allclose(terms(earlier)[c, y, xx], base[c, y, xx])
    assert depends_on_earlier, "no conditional depends on the sub-pixel before it: not autoregressive"


def terms_batch(m, x):
    return m.likelihood.log_prob(m(x), x)


@pytest.mark.parametrize("name", sorted(TINY))
def test_baseline_activations_and_size(name):
    _exact_only(name)
    m = _prior(name)
    x = torch.randint(0, 2, (3, 1, 5, 6))
    a = activations(m, x)
    assert a.shape == (3, m.hidden_size((5, 6, 1))) and torch.isfinite(a).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpoint_round_trip(name, tmp_path):
    m = _prior(name, 3, 4)
    x = torch.randint(0, 4, (2, 3, 4, 4))
    again = prior_from_files(prior_files(m))
    assert type(again) is type(m) and again.config == m.config
    assert torch.equal(_log_prob(m, x), _log_prob(again, x))
    save_prior(m, tmp_path / "p")
    assert torch.equal(_log_prob(m, x), _log_prob(load_prior(tmp_path / "p"), x))


@pytest.mark.parametrize("name", sorted(TINY))
def test_scores_exact(name):
    """fisher_scores equals one backward pass per image (Gram matrices within 1e-5 relative)."""
    _exact_only(name)
    m = _prior(name, 3, 4)
    x = torch.randint(0, 4, (5, 3, 4, 4))
    ref = fisher_scores_reference(m, x)
    fast = fisher_scores(m, x, chunk_size=2)
    assert fast.shape == ref.shape == (5, n_features(m))
    gram, gram_ref = fast @ fast.T, ref @ ref.T
    assert torch.allclose(gram, gram_ref, rtol=1e-5, atol=1e-5 * float(gram_ref.abs().max()))


@pytest.mark.parametrize("name", sorted(TINY))
def test_training_lowers_the_nll(name):
    from fisher.training import train_step
    m = _prior(name, hw=(6, 6)).train()
    x = (torch.rand(32, 1, 6, 6) < torch.linspace(0.1, 0.9, 36).view(1, 1, 6, 6)).long()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = [train_step(m, opt, x) for _ in range(30)]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.9 * losses[0], losses[::10]
