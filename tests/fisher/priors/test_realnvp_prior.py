"""The unconditional RealNVP prior: exact latent round trip, the dequantized bound, the embedding kind and
the latent decoder that decodes it."""
import pytest
import torch

from fisher.decoders import build_decoder
from fisher.decoders.realnvp import RealNVPDecoder
from fisher.embedding import Embedder, EmbedSpec
from fisher.errors import FisherError
from fisher.flow import MultiscaleFlow
from fisher.priors import build_prior

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **config):
    torch.manual_seed(seed)
    m = build_prior("realnvp", **{"channels": 3, "levels": 32, "scales": 2, "features": 6, "blocks": 1, **config})
    with torch.no_grad():                     # away from the identity the couplings start at
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def _images(n=4, shape=(3, 8, 8), levels=32, seed=1):
    return torch.randint(0, levels, (n, *shape), generator=torch.Generator().manual_seed(seed))


def test_the_latent_round_trip_is_exact():
    m, x = _model(), _images()
    with torch.no_grad():
        z = m.encode(x)
        assert z.shape == (4, 3 * 8 * 8)
        assert torch.equal(m.decode(z, torch.zeros(x.shape)), x)           # f⁻¹(f(x)) lands in x's cell
        v = torch.randn(4, 3, 8, 8)
        parts, _ = m.flow(v)
        assert (m.flow.inverse(m.flow.unflatten(m.flow.flatten(parts), 8, 8)) - v).abs().max() < 1e-4
        assert not torch.allclose(z, m.encode(torch.zeros_like(x)))


def test_same_flow_as_the_conditional_decoder():
    """One flow implementation: the prior is the decoder's network without conditioning."""
    m = _model()
    dec = build_decoder("realnvp", 5, (8, 8, 3), 32, scales=2, features=6, blocks=1)
    assert isinstance(m.flow, MultiscaleFlow) and isinstance(dec, RealNVPDecoder) and isinstance(dec.net, MultiscaleFlow)
    cond = {k for k in dec.net.state_dict() if ".cond." in k}
    assert cond and {k for k in dec.net.state_dict() if k not in cond} == set(m.flow.state_dict())


def test_eval_log_prob_is_seeded_per_image_and_a_bound():
    m, x = _model(), _images(6)
    with torch.no_grad():
        lp = m.log_prob(x)
        assert torch.allclose(m.log_prob(x[2:3]), lp[2:3], rtol=1e-5) and torch.equal(m.log_prob(x), lp)
        m.train()
        assert not torch.equal(m.log_prob(x), lp)                            # fresh dequantization noise
    assert m.exact_likelihood is False and m.bound == "dequantized"
    assert (lp < 0).all()


def test_training_lowers_the_bound():
    m, x = _model(scales=1), _images(16, (3, 4, 4), seed=2)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(-m.eval().log_prob(x).mean())
    for _ in range(40):
        m.train()
        opt.zero_grad()
        loss = -m.log_prob_from_output(m(x), x).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(-m.eval().log_prob(x).mean()) < before - 5


def test_sizes_the_scales_do_not_divide_are_refused():
    m = _model(scales=2)
    with pytest.raises(FisherError, match="scales=2 needs sides divisible"):
        m.latent_size((6, 6, 3))


def test_embedding_kind_and_latent_decoder():
    m, x = _model(), _images(5)
    images = x.permute(0, 2, 3, 1).numpy().astype("uint8")
    emb = Embedder(m, "realnvp", [EmbedSpec()], (8, 8, 3))
    z = torch.from_numpy(emb(images)["z"])
    assert emb.n_features == 192 and z.shape == (5, 192)
    dec = build_decoder("latent", 192, (8, 8, 3), 32, model="realnvp", model_config=vars(m.config))
    dec.model.load_state_dict(m.state_dict())
    dec.eval()
    assert torch.equal(dec.sample(z), x)
    assert torch.allclose(dec.generate(z), x / 31.0)
    assert not dec.has_likelihood and not dec.trainable
    with pytest.raises(FisherError, match="latent has 192 numbers"):
        build_decoder("latent", 10, (8, 8, 3), 32, model="realnvp", model_config=vars(m.config))
    with pytest.raises(FisherError, match="takes it from the embeddings' --prior"):
        build_decoder("latent", 192, (8, 8, 3), 32)


def test_kinds_that_need_another_model_are_refused():
    m, pixelcnn = _model(), build_prior("pixelcnn", channels=3, levels=32, n_layers=1, filters=6)
    with pytest.raises(FisherError, match="no exact log-likelihood .* --kind realnvp"):
        Embedder(m, "fisher", [EmbedSpec(16)], (8, 8, 3))
    with pytest.raises(FisherError, match="defines no baseline activations .*; embed its latent with --kind realnvp"):
        Embedder(m, "activation", [EmbedSpec(16)], (8, 8, 3))
    with pytest.raises(FisherError, match="--kind realnvp: needs a `fisher train-prior --prior realnvp` model"):
        Embedder(pixelcnn, "realnvp", [EmbedSpec()], (8, 8, 3))
    with pytest.raises(FisherError, match="prior 'pixelcnn' has no latent"):
        build_decoder("latent", 192, (8, 8, 3), 32, model="pixelcnn", model_config={"channels": 3, "levels": 32})
