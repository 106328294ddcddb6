"""Gated PixelCNN (van den Oord et al. 2016): the receptive field has no blind spot, masks are applied
in the forward pass, conditioning enters every gate, the paper's size."""
import itertools

import pytest
import torch

from fisher.priors import build_prior
from fisher.scores import free_masks, n_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _input_grad(m, x, c, y0, x0):
    """∂ (head parameters of sub-pixel (c, y0, x0)) / ∂ (scaled input), summed: (C, H, W)."""
    xin = m.scale(x).float().requires_grad_()
    out = m.forward_scaled(xin) if hasattr(m, "forward_scaled") else None
    if out is None:                      # PixelCNN: run its layers on the scaled input
        h = xin
        for layer in m.hidden_layers:
            h = torch.relu(layer(h))
        out = m.likelihood.view(m.output(h), m.channels)
    sel = out[0, c, y0, x0] if out.dim() == 4 else out[0, c, :, y0, x0]
    return torch.autograd.grad(sel.sum(), xin)[0][0]


@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 4)])
def test_receptive_field_is_causal_and_has_no_blind_spot(channels, levels):
    torch.manual_seed(0)
    m = build_prior("gated", channels=channels, levels=levels, n_layers=3, filters=24, kernel_size=3).eval()
    hw = 9
    x = torch.randint(0, levels, (1, channels, hw, hw))
    y0, x0 = 5, 4
    order = lambda c, y, xx: (y * hw + xx) * channels + c
    reach = 3 * (3 // 2)                                   # layers × kernel radius
    for c in range(channels):
        g = _input_grad(m, x, c, y0, x0)
        for cc, yy, xx in itertools.product(range(channels), range(hw), range(hw)):
            if order(cc, yy, xx) >= order(c, y0, x0):
                assert g[cc, yy, xx] == 0, ("depends on a later sub-pixel", c, cc, yy, xx)
        seen = g.abs().sum(0) != 0
        for yy in range(y0 - reach, y0):                   # every row above, left and right of x0
            assert seen[yy, max(0, x0 - reach):x0 + reach + 1].all(), (c, yy, seen[yy])
        assert seen[y0, x0 - reach:x0].all()               # the current row, to the left
        if c > 0:                                           # earlier colours of the same pixel
            assert (g[:c, y0, x0] != 0).all()


def test_the_plain_pixelcnn_has_the_blind_spot_the_gated_one_removes():
    """Above and to the right, beyond one kernel's reach: PixelCNN cannot see it, Gated PixelCNN can."""
    torch.manual_seed(0)
    x = torch.randint(0, 2, (1, 1, 8, 8))
    y0, x0 = 4, 3
    plain = build_prior("pixelcnn", n_layers=2, filters=6, kernel_size=3).eval()
    gated = build_prior("gated", n_layers=2, filters=6, kernel_size=3).eval()
    assert _input_grad(plain, x, 0, y0, x0)[0, y0 - 1, x0 + 2] == 0
    assert _input_grad(gated, x, 0, y0, x0)[0, y0 - 1, x0 + 2] != 0


def test_masks_are_applied_in_forward_and_left_out_of_the_score():
    torch.manual_seed(0)
    m = build_prior("gated", channels=3, levels=4, n_layers=2, filters=6, kernel_size=3)
    weights_before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 4, (2, 3, 5, 5))
    m.log_prob(x)
    assert all(torch.equal(weights_before[k], v) for k, v in m.state_dict().items())      # never zeroed in place
    masks = free_masks(m)
    pinned = sum(int((~mk).sum()) for mk in masks.values())
    assert pinned > 0 and n_features(m) == sum(p.numel() for p in m.parameters()) - pinned
    # a pinned weight has an exactly-zero gradient
    m.zero_grad()
    (-m.log_prob(x).sum()).backward()
    for name, p in m.named_parameters():
        assert (p.grad[~masks[name]] == 0).all(), name


def test_conditioning_enters_every_gate():
    torch.manual_seed(0)
    m = build_prior("gated", n_layers=2, filters=6, kernel_size=3, condition_dim=4).eval()
    x = torch.randint(0, 2, (2, 1, 5, 5))
    h1, h2 = torch.randn(2, 4), torch.randn(2, 4)
    a, b = m.forward(x, h1), m.forward(x, h2)
    assert not torch.allclose(a, b)
    assert all(layer.cond_v is not None and layer.cond_h is not None for layer in m.layers)
    # still a normalised distribution for each fixed h
    xs = torch.tensor(list(itertools.product([0, 1], repeat=4))).view(-1, 1, 2, 2)
    lp = m.likelihood.log_prob(m.forward(xs, h1[:1].expand(len(xs), 4)), xs).flatten(1).sum(1)
    assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-5)


def test_paper_size():
    """Appendix 7.1.2: 5 layers, 120 filters, kernel 7; about 4 M parameters on 5-bit RGB (the paper says
    'about 5 million')."""
    m = build_prior("gated", channels=3, levels=32)
    assert (len(m.layers), m.config.filters, m.config.kernel_size) == (5, 120, 7)
    assert 3.5e6 < sum(p.numel() for p in m.parameters()) < 5.5e6


def _spatial_model(channels, levels, layers, filters, kernel, d=3, hw=(5, 6), seed=0):
    """A conditional model with weights far from the init (a wrong cache entry shows) and a map (1, d, H, W)."""
    torch.manual_seed(seed)
    m = build_prior("gated", channels=channels, levels=levels, n_layers=layers, filters=filters, kernel_size=kernel,
                    condition_dim=d).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return m, torch.randn(3, d, *hw)


@pytest.mark.parametrize("channels, levels, layers, filters, kernel", [(1, 2, 3, 8, 3), (3, 4, 2, 12, 5)])
def test_cached_sampler_with_a_conditioning_map_equals_the_full_network(channels, levels, layers, filters, kernel):
    from fisher.priors.gated import inverse_cdf
    m, cond = _spatial_model(channels, levels, layers, filters, kernel)
    b, _, h, w = cond.shape
    u = torch.rand(b, channels, h, w, generator=torch.Generator().manual_seed(1))
    naive = torch.zeros(b, channels, h, w, dtype=torch.long)
    with torch.no_grad():
        for i, j, k in itertools.product(range(h), range(w), range(channels)):
            naive[:, k, i, j] = inverse_cdf(m.likelihood, m(naive, cond), u)[:, k, i, j]
    cached = m.sample_with(u, cond)
    assert torch.equal(cached, naive) and len(cached.unique()) == levels
    assert not torch.equal(cached, m.sample_with(u, cond.flip(-1)))        # the map's location matters


@pytest.mark.parametrize("channels, levels", [(1, 2), (3, 4)])
def test_a_conditioning_map_keeps_the_model_causal(channels, levels):
    m, cond = _spatial_model(channels, levels, 2, 6, 3, hw=(4, 4))
    cond, gen = cond[:1], torch.Generator().manual_seed(2)
    x = torch.randint(0, levels, (1, channels, 4, 4), generator=gen)
    order = [(c, y, xx) for y in range(4) for xx in range(4) for c in range(channels)]
    base = m(x, cond)
    for n, (c, y, xx) in enumerate(order):
        later = x.clone()
        for cc, yy, xxx in order[n:]:                                       # this sub-pixel and every later one
            later[0, cc, yy, xxx] = torch.randint(0, levels, (1,), generator=gen)
        assert torch.allclose(m(later, cond)[0, c, ..., y, xx], base[0, c, ..., y, xx], atol=1e-6), (c, y, xx)
