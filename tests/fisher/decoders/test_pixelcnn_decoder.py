"""The conditional PixelCNN decoder: the cached sampler computes what the full network computes, the loss
is the exact -log p(x | z), decoding repeats per embedding row, training lowers the NLL."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fisher.decoders import build_decoder
from fisher.priors.gated import inverse_cdf
from fisher.errors import FisherError

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder(shape=(6, 6, 3), levels=4, z_dim=5, seed=0, **config):
    torch.manual_seed(seed)
    dec = build_decoder("pixelcnn", z_dim, shape, levels, **{"layers": 2, "filters": 6, "kernel": 3, **config})
    dec.fit_input(torch.randn(16, z_dim) * 3 + 1)
    return dec.eval()


def _randomize(dec, std=0.5):
    """Weights far from the init, so that a wrong cache entry moves the head's distribution visibly."""
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(std * torch.randn_like(p))
    return dec


def _reference_sample(dec, z, u):
    """The slow sampler: the full network on the whole image for every sub-pixel, the same inverse CDF."""
    cond, (b, c, height, width) = dec.standardize(z), u.shape
    x = torch.zeros(b, c, height, width, dtype=torch.long)
    with torch.no_grad():
        for i, j, k in itertools.product(range(height), range(width), range(c)):
            x[:, k, i, j] = inverse_cdf(dec.likelihood, dec.net(x, cond), u)[:, k, i, j]
    return x


@pytest.mark.parametrize("shape, levels, layers, filters, kernel", [
    ((5, 6, 1), 2, 3, 8, 3),          # binary: Bernoulli head, mask A only on the one colour
    ((5, 6, 3), 4, 2, 12, 5),         # RGB, categorical: R → G → B within a pixel
    ((5, 6, 3), 4, 3, 9, 3),
])
def test_cached_sampling_equals_the_full_network_per_sub_pixel(shape, levels, layers, filters, kernel):
    dec = _randomize(_decoder(shape, levels, layers=layers, filters=filters, kernel=kernel))
    z = torch.randn(4, 5)
    h, w, c = shape
    u = torch.rand(4, c, h, w, generator=torch.Generator().manual_seed(1))
    cached = dec.sample(z, torch.Generator().manual_seed(1))            # draws the same uniforms
    assert torch.equal(cached, _reference_sample(dec, z, u))
    assert len(cached.unique()) == levels                               # not a constant image


def test_loss_is_the_exact_nll_and_depends_on_z():
    dec = _randomize(_decoder(), std=0.3)
    z, x = torch.randn(3, 5), torch.randint(0, 4, (3, 3, 6, 6))
    with torch.no_grad():
        logits = dec.net(x, dec.standardize(z))                         # (B, C, levels, H, W)
    nll = -F.log_softmax(logits, dim=2).gather(2, x[:, :, None]).flatten(1).sum(1)
    assert torch.allclose(dec.loss(z, x), nll)
    assert not torch.allclose(dec.loss(torch.randn(3, 5), x), nll)     # the embedding conditions every gate
    m = dec.reconstruction_metrics(z, x)
    assert m["nll_sum"] == pytest.approx(float(nll.sum()), rel=1e-5) and m["n_images"] == 3
    with pytest.raises(FisherError, match="no closed-form mean"):
        dec.mean(z)


def test_p_x_given_z_sums_to_one():
    dec = _randomize(_decoder((2, 2, 1), 2, filters=4), std=0.5)
    xs = torch.tensor(list(itertools.product([0, 1], repeat=4))).view(-1, 1, 2, 2)
    z = torch.randn(1, 5).expand(len(xs), 5)
    assert float(torch.logsumexp(-dec.loss(z, xs), 0)) == pytest.approx(0.0, abs=1e-5)


def test_sampling_repeats_per_embedding_row():
    dec = _randomize(_decoder(), std=0.3)
    z = torch.randn(3, 5)
    a = dec.sample(z)
    b = dec.sample(torch.cat([torch.randn(2, 5), z[1:2]]))
    assert torch.equal(a[1], b[2]) and not torch.equal(a[0], a[1])
    assert a.dtype == torch.long and 0 <= int(a.min()) and int(a.max()) < 4
    other = _randomize(_decoder(sample_seed=1), std=0.3)
    assert not torch.equal(other.sample(z), a)                          # same weights, another seed


def test_training_lowers_the_nll():
    dec = _decoder(filters=8)
    z, x = torch.randn(8, 5), torch.randint(0, 4, (8, 3, 6, 6), generator=torch.Generator().manual_seed(0))
    x[:, :, :3] = 0                                                     # structure to learn
    opt = dec.make_optimizer(1e-2)
    before = float(dec.loss(z, x).mean())
    for _ in range(30):
        dec.train_step(opt, z, x)
    assert float(dec.loss(z, x).mean()) < 0.8 * before


def test_config_is_checked():
    with pytest.raises(FisherError, match="odd kernel"):
        build_decoder("pixelcnn", 3, (4, 4, 1), 2, kernel=4)
    with pytest.raises(FisherError, match="filters=2 must be >= channels=3"):
        build_decoder("pixelcnn", 3, (4, 4, 3), 4, filters=2)
