"""Pyramid PixelCNN (paper appendix 7.1.2): an exact, normalised likelihood over every image of a tiny
size for 2 and 3 levels, level terms that sum to log_prob, causality sub-pixel by sub-pixel in the
pyramid order (across levels too), PixelCNN++ streams causal in raster order at any size with no blind
spot, the logistic mixture's edge bins in the pyramid's output, exact Fisher scores on both score
paths, a 32×32 5-bit RGB smoke test of the CPU preset, and the paper config's size."""
import itertools

import pytest
import torch

from fisher.errors import FisherError
from fisher.priors import build_prior, prior_files, prior_from_files
from fisher.priors.pixelcnnpp import PixelCNNpp
from fisher.priors.pyramid import PyramidPixelCNN, PyramidPixelCNNConfig
from fisher.scores import fisher_scores, fisher_scores_reference, fisher_scores_vmap, n_features

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"filters": 6, "nr_resnet": 1, "components": 2, "dropout": 0.0, "cond_layers": 1}
CPU_PRESET = {"factors": [2, 4], "filters": 16, "nr_resnet": 1, "stages": 2, "components": 5}   # 32×32: 4 → 8 → 32


def _pyramid(channels=1, levels=2, seed=0, **kw):
    torch.manual_seed(seed)
    return build_prior("pyramid", channels=channels, levels=levels, **{**SMALL, **kw}).eval()


def _all_images(channels, levels, h, w):
    return torch.tensor(list(itertools.product(range(levels), repeat=channels * h * w))).view(-1, channels, h, w)


@pytest.mark.parametrize("channels, levels, h, w, factors, stages", [
    (1, 2, 4, 3, [2], 2),          # 2 levels: 2×2 → 4×3 (odd width), strided/transposed convs inside
    (1, 2, 4, 2, [2, 2], 2),       # 3 levels: 1×1 → 2×1 → 4×2
    (3, 3, 1, 3, [2, 2], 1),       # 3 levels of 3-value RGB: 1×1 → 1×2 → 1×3
    (3, 2, 2, 2, [2], 1),          # binary RGB, 2 levels
])
def test_normalises_over_every_image(channels, levels, h, w, factors, stages):
    """Σ_x p(x) = 1 over all levels^(C·H·W) images: the pyramid is exact, not a bound."""
    m = _pyramid(channels, levels, factors=factors, stages=stages)
    xs = _all_images(channels, levels, h, w)
    with torch.no_grad():
        lp = m.log_prob(xs)
        by_level = m.level_log_probs(xs)
    assert len(by_level) == len(factors) + 1 and torch.isfinite(lp).all()
    assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(sum(by_level), lp, atol=1e-5)
    # the lowest level alone is a normalised model of x_0: its marginal over the images is Σ = 1 per x_0
    low = m.pyramid(xs)[0].flatten(1)
    marg = {}
    for key, v in zip(map(tuple, low.tolist()), by_level[0]):
        marg.setdefault(key, float(v))
    assert float(torch.logsumexp(torch.tensor(list(marg.values())), 0)) == pytest.approx(0.0, abs=1e-5)


def test_level_sizes_and_pyramid_are_strided_subsamples():
    m = _pyramid(factors=[4, 4])
    assert m.strides == [16, 4, 1] and m.level_sizes(128, 128) == [(8, 8), (32, 32), (128, 128)]
    assert m.level_sizes(7, 5) == [(1, 1), (2, 2), (7, 5)]
    x = torch.randint(0, 2, (2, 1, 9, 7))
    m2 = _pyramid(factors=[2])
    x0, x1 = m2.pyramid(x)
    assert x1 is x and torch.equal(x0, x[:, :, ::2, ::2]) and x0.shape[-2:] == (5, 4)
    lm = m.level_map(8, 8)
    assert lm[0, 0] == 0 and lm[4, 0] == 1 and lm[4, 4] == 1 and lm[0, 1] == 2 and int((lm == 1).sum()) == 3


@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 5)])
def test_level_terms_sum_to_log_prob(channels, levels):
    """Σ_l level_log_probs = log_prob (the levels' own outputs vs forward's placement on x's grid), and
    each level's sum is the sum of forward's terms over the pixels it models."""
    m = _pyramid(channels, levels, factors=[2, 2], stages=2)
    x = torch.randint(0, levels, (3, channels, 8, 6))
    with torch.no_grad():
        by_level = m.level_log_probs(x)
        lp = m.log_prob(x)
        terms = m.likelihood.log_prob(m(x), x)                         # (B, C, H, W)
    assert torch.allclose(sum(by_level), lp, rtol=1e-6, atol=1e-4)
    lm = m.level_map(8, 6)
    for l, v in enumerate(by_level):
        assert torch.allclose((terms * (lm == l)).flatten(1).sum(1), v, rtol=1e-6, atol=1e-4), l


def _pyramid_order(m, channels, h, w):
    """Sub-pixels (c, y, x) of x in the order the pyramid generates them: level, raster, colour."""
    lm = m.level_map(h, w)
    return sorted(((c, y, xx) for y in range(h) for xx in range(w) for c in range(channels)),
                  key=lambda p: (int(lm[p[1], p[2]]), p[1], p[2], p[0]))


@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 4)])
def test_causal_in_the_pyramid_order(channels, levels):
    """A sub-pixel's term does not change when any sub-pixel later in the pyramid order changes (later
    pixels of its level, any pixel of higher levels), and each conditional is a distribution."""
    m = _pyramid(channels, levels, factors=[2, 2], stages=2)
    h = w = 6
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, levels, (1, channels, h, w), generator=gen)
    order = _pyramid_order(m, channels, h, w)

    def terms(img):
        with torch.no_grad():
            return m.likelihood.log_prob(m(img), img)

    base = terms(x)[0]
    for k, (c, y, xx) in enumerate(order):
        later = x.clone()
        for cc, yy, xxx in order[k + 1:]:
            later[0, cc, yy, xxx] = torch.randint(0, levels, (1,), generator=gen)
        assert torch.allclose(terms(later)[0, c, y, xx], base[c, y, xx], atol=1e-6), (c, y, xx)
        values = x.repeat(levels, 1, 1, 1)
        values[:, c, y, xx] = torch.arange(levels)
        assert float(torch.logsumexp(terms(values)[:, c, y, xx], 0)) == pytest.approx(0.0, abs=1e-5)


def test_conditional_levels_see_the_lower_level_ahead_of_them():
    """A full-resolution term depends on a lower-level pixel that is later in raster order (the level is
    conditioned on all of x_low, through the non-causal conditioning layers), and on the pixel before it."""
    m = _pyramid(1, 2, factors=[2], stages=1, cond_layers=2)
    x = torch.randint(0, 2, (1, 1, 6, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = m.likelihood.log_prob(m(x), x)[0, 0]
        ahead = x.clone()
        ahead[0, 0, 2, 2] = 1 - ahead[0, 0, 2, 2]                   # in x_low, after (1, 1) in raster order
        before = x.clone()
        before[0, 0, 1, 0] = 1 - before[0, 0, 1, 0]                 # the full-level pixel left of (1, 1)
        assert base[1, 1] != m.likelihood.log_prob(m(ahead), ahead)[0, 0, 1, 1]
        assert base[1, 1] != m.likelihood.log_prob(m(before), before)[0, 0, 1, 1]


@pytest.mark.parametrize("h, w, stages", [(8, 8, 3), (7, 5, 3), (5, 6, 2)])
@pytest.mark.parametrize("channels", [1, 3])
def test_pixelcnnpp_streams_are_causal_with_no_blind_spot(h, w, stages, channels):
    """∂ head parameters of sub-pixel (c, y0, x0) / ∂ scaled input: zero for every later sub-pixel in
    raster/colour order, non-zero above-right (no blind spot) and for the earlier colours of the pixel."""
    torch.manual_seed(0)
    net = PixelCNNpp(channels, 6, filters=2 * channels + 4, nr_resnet=1, stages=stages).eval()
    xs = (torch.rand(1, channels, h, w) * 2 - 1).requires_grad_()
    out = net(xs)[0].view(1, channels, 6, h, w)
    y0, x0 = h // 2, w // 2
    for c in range(channels):
        g = torch.autograd.grad(out[0, c, :, y0, x0].sum(), xs, retain_graph=True)[0][0]
        for cc, yy, xx in itertools.product(range(channels), range(h), range(w)):
            if (yy, xx, cc) >= (y0, x0, c):
                assert g[cc, yy, xx] == 0, ("sees a later sub-pixel", c, cc, yy, xx)
        seen = g.abs().sum(0) != 0
        assert seen[y0 - 1, x0 + 1] and seen[y0, x0 - 1] and seen[0, w - 1] and seen[y0 - 1, 0]
        if c > 0:
            assert (g[:c, y0, x0] != 0).all()


def test_logistic_mixture_edge_bins_in_the_pyramid_output():
    """For the pyramid's head parameters (also pushed far past both ends of [-1, 1]): the 2^bits values of
    a sub-pixel have probabilities summing to 1, and the edge bins are the tails σ(·) and 1 - σ(·)."""
    m = _pyramid(3, 32, factors=[2], stages=1)
    x = torch.randint(0, 32, (2, 3, 4, 4))
    with torch.no_grad():
        params = m(x)
    k = m.likelihood.components
    for shift in (0.0, -4.0, 4.0):
        p = params.clone()
        p[:, :, k:2 * k] += shift                                    # the means
        lps = m.likelihood.log_probs(p)                              # (B, C, 32, H, W)
        assert torch.allclose(torch.logsumexp(lps, 2), torch.zeros(()), atol=1e-5)
        d = p.double()
        w = torch.softmax(d[:, :, :k], 2)
        mu, inv_s = d[:, :, k:2 * k], torch.exp(-d[:, :, 2 * k:].clamp(min=-7.0))
        half = 1.0 / 31
        first = (w * torch.sigmoid(inv_s * (-1.0 + half - mu))).sum(2)
        last = (w * (1 - torch.sigmoid(inv_s * (1.0 - half - mu)))).sum(2)
        assert torch.allclose(lps[:, :, 0].double().exp(), first, rtol=1e-4, atol=1e-7)
        assert torch.allclose(lps[:, :, 31].double().exp(), last, rtol=1e-4, atol=1e-7)
        assert torch.isfinite(m.likelihood.log_prob(p, torch.zeros_like(x))).all()
        assert torch.isfinite(m.likelihood.log_prob(p, torch.full_like(x, 31))).all()


@pytest.mark.parametrize("stages", [1, 2])
def test_scores_exact(stages):
    """fisher_scores and the generic vmap scores equal one backward per image: stride-1 convs only
    (stages=1), and strided and transposed convs between stages (stages=2)."""
    m = _pyramid(3, 4, factors=[2], stages=stages)
    x = torch.randint(0, 4, (4, 3, 4, 4))
    ref = fisher_scores_reference(m, x)
    gram_ref = ref @ ref.T
    for got in (fisher_scores(m, x, chunk_size=2), fisher_scores_vmap(m, x)):
        assert got.shape == ref.shape == (4, n_features(m))
        assert torch.allclose(got @ got.T, gram_ref, rtol=1e-5, atol=1e-5 * float(gram_ref.abs().max()))
    assert n_features(m) < sum(p.numel() for p in m.parameters())          # the colour masks pin weights


def test_cpu_preset_on_32x32_5bit_rgb_forward_backward():
    torch.manual_seed(0)
    m = build_prior("pyramid", channels=3, levels=32, **CPU_PRESET)
    assert m.level_sizes(32, 32) == [(4, 4), (8, 8), (32, 32)]
    x = torch.randint(0, 32, (2, 3, 32, 32))
    m.train()
    out = m(x)
    assert out.shape == (2, 3, 3 * 5, 32, 32)
    loss = -m.log_prob_from_output(out, x).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():                      # the levels' terms add up to the exact log-likelihood
        assert torch.allclose(sum(m.level_log_probs(x)), m.log_prob(x), rtol=1e-5)
        before = -m.log_prob(x).mean()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    opt.step()                                 # the gradient above points downhill: one step lowers the NLL
    with torch.no_grad():
        assert -m.log_prob(x).mean() < before
    assert m.hidden(x).shape == (2, 16, 32, 32) and m.hidden_size((32, 32, 3)) == 16 * 32 * 32
    assert 50_000 < sum(p.numel() for p in m.parameters()) < 500_000


def test_paper_config_has_about_20_million_parameters():
    m = PyramidPixelCNN()
    cfg = m.config
    assert (cfg.channels, cfg.levels, cfg.factors, cfg.components) == (3, 32, [4, 4], 10)
    assert m.level_sizes(128, 128) == [(8, 8), (32, 32), (128, 128)]
    total = sum(p.numel() for p in m.parameters())
    per_level = [sum(p.numel() for p in net.parameters()) for net in m.nets]
    assert 19e6 < total < 22e6, total
    assert 6e6 < per_level[0] < per_level[1] == per_level[2] < 7.5e6, per_level


def test_config_factors_parse_and_bad_values_are_refused():
    assert PyramidPixelCNNConfig(factors="4,4").factors == [4, 4]
    assert PyramidPixelCNNConfig(factors="").factors == []
    assert PyramidPixelCNNConfig(factors=2).factors == [2]
    for bad in ({"factors": [1]}, {"factors": "4,a"}, {"filters": 2}, {"dropout": 1.0}, {"cond_layers": -1}):
        with pytest.raises(FisherError):
            build_prior("pyramid", channels=3, levels=32, **{**SMALL, **bad})


def test_checkpoint_round_trip_of_a_multi_level_prior():
    m = _pyramid(3, 4, factors="2,2", stages=2)
    again = prior_from_files(prior_files(m))
    assert again.config == m.config and again.config.factors == [2, 2]
    x = torch.randint(0, 4, (2, 3, 8, 8))
    assert torch.equal(m.log_prob(x), again.log_prob(x))


def test_hidden_is_the_last_levels_final_ul_stream():
    m = _pyramid(1, 2, factors=[2], stages=2)
    x = torch.randint(0, 2, (2, 1, 6, 6))
    with torch.no_grad():
        h = m.hidden(x)
        low = m.cond_nets[0](m.scale(x[:, :, ::2, ::2]))
        from fisher.priors.pyramid import _upsample
        ul = m.nets[-1].streams(m.scale(x), _upsample(low, 2, (6, 6)))
    assert h.shape == (2, 6, 6, 6) and torch.equal(h, ul)


def test_training_lowers_the_nll_of_a_two_level_pyramid():
    from fisher.training import train_step
    m = _pyramid(1, 2, factors=[2], stages=1).train()
    x = (torch.rand(32, 1, 6, 6) < torch.linspace(0.1, 0.9, 36).view(1, 1, 6, 6)).long()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = [train_step(m, opt, x) for _ in range(25)]
    assert losses[-1] < 0.9 * losses[0], losses[::5]
