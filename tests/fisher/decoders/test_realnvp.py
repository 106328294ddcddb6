"""The conditional multiscale RealNVP decoder: invertibility, exact log-determinant, the discrete NLL's
accounting, conditioning, reproducible decoding, training."""
import math

import pytest
import torch

from fisher.decoders import build_decoder, load_decoder, save_decoder
from fisher.flow import LOGIT_ALPHA, from_logit, n_scales as _n_scales
from fisher.errors import FisherError

pytestmark = pytest.mark.usefixtures("one_thread")


def _flow(shape=(8, 8, 3), levels=32, z_dim=5, seed=0, **config):
    torch.manual_seed(seed)
    dec = build_decoder("realnvp", z_dim, shape, levels, **{"features": 6, "blocks": 1, **config})
    with torch.no_grad():                     # away from the identity the couplings start at
        for p in dec.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dec.eval()


def test_scales_follow_the_image_size():
    assert [_n_scales(s, s, 0) for s in (8, 28, 32, 64, 128)] == [1, 2, 3, 4, 5]
    dec = build_decoder("realnvp", 3, (32, 32, 3), 32)
    assert dec.shapes == [(6, 16, 16), (12, 8, 8), (24, 4, 4), (24, 4, 4)]       # factored parts, then the last
    assert sum(c * h * w for c, h, w in dec.shapes) == 32 * 32 * 3
    with pytest.raises(FisherError, match="scales=2 needs sides divisible"):
        build_decoder("realnvp", 3, (6, 6, 1), 2, scales=2)


def test_flow_inverts():
    dec = _flow()
    v, h = torch.randn(3, 3, 8, 8), torch.randn(3, 5)
    with torch.no_grad():
        parts, _ = dec.flow(v, h)
        back = dec.inverse(parts, h)
    assert (back - v).abs().max() < 1e-4
    assert not torch.allclose(torch.cat([p.flatten(1) for p in parts], 1), v.flatten(1))   # not the identity


def test_log_determinant_is_the_jacobians():
    dec = _flow(shape=(4, 4, 1), levels=4, scales=1).double()
    h = torch.randn(1, 5, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 4, dtype=torch.float64)

    def f(flat):
        parts, _ = dec.flow(flat.view(1, 1, 4, 4), h)
        return torch.cat([p.flatten() for p in parts])

    jac = torch.autograd.functional.jacobian(f, v.flatten())
    _, logdet = dec.flow(v, h)
    assert float(logdet) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-8)
    assert abs(float(logdet)) > 1e-3                                                   # a real test


def test_nll_of_the_identity_flow_is_the_closed_form():
    """A fresh flow is the identity (zero-initialized last layers): -log p(x) is the Gaussian density of the
    logit-transformed dequantized image, minus its log-Jacobian, plus D log L."""
    torch.manual_seed(0)
    levels = 32
    dec = build_decoder("realnvp", 4, (8, 8, 3), levels, features=4, blocks=1).eval()
    x = torch.randint(0, levels, (2, 3, 8, 8))
    u = torch.rand(x.shape)
    p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * (x + u) / levels
    v = torch.log(p / (1 - p))
    want = (0.5 * v ** 2 + 0.5 * math.log(2 * math.pi) - math.log(1 - 2 * LOGIT_ALPHA)
            + torch.log(p) + torch.log1p(-p)).flatten(1).sum(1) + x[0].numel() * math.log(levels)
    got = dec.nll(torch.randn(2, 4), x, u)
    assert torch.allclose(got, want, rtol=1e-5)


def test_conditioning_changes_the_flow_and_the_samples():
    dec = _flow()
    v = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)
    h = torch.randn(2, 5)
    with torch.no_grad():
        parts, _ = dec.flow(v, h)
        a, b = dec.sample(h[:1]), dec.sample(h[1:])
    assert not torch.allclose(parts[-1][0], parts[-1][1])
    assert not torch.equal(a, b)


def test_decoding_is_seeded_per_image_and_tempered():
    dec = _flow()
    z = torch.randn(5, 5)
    with torch.no_grad():
        whole = dec.sample(z)
        assert torch.equal(dec.sample(z[3:4]), whole[3:4])                 # whatever the batch
        assert torch.equal(dec.sample(z.flip(0)), whole.flip(0))
        cold = build_decoder("realnvp", 5, (8, 8, 3), 32, features=6, blocks=1, temperature=0.0)
        cold.load_state_dict(dec.state_dict())
        cold.eval()
        mode = cold.inverse([torch.zeros(1, *s) for s in cold.shapes], cold.standardize(z[:1]))
        assert torch.equal(cold.sample(z[:1]), from_logit(mode, 32))       # T = 0: f⁻¹(0)
    other = build_decoder("realnvp", 5, (8, 8, 3), 32, features=6, blocks=1, sample_seed=1)
    other.load_state_dict(dec.state_dict())
    with torch.no_grad():
        assert not torch.equal(other.eval().sample(z), whole)


def test_checkpoint_keeps_the_decoding_options(tmp_path):
    dec = build_decoder("realnvp", 5, (8, 8, 3), 32, features=6, blocks=1, temperature=0.7, sample_seed=3)
    save_decoder(dec, tmp_path)
    back = load_decoder(tmp_path)
    assert (back.temperature, back.seed) == (0.7, 3)
    z = torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(back.sample(z), dec.eval().sample(z))


def test_training_lowers_the_nll():
    torch.manual_seed(0)
    dec = build_decoder("realnvp", 3, (8, 8, 1), 4, features=8, blocks=1)
    z = torch.randn(16, 3)
    x = (torch.arange(64).view(1, 1, 8, 8) % 4).expand(16, -1, -1, -1).clone()   # stripes: learnable
    dec.fit_input(z)
    before = float(dec.eval().nll(z, x).mean())
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(40):
        dec.train_step(opt, z, x)
    after = float(dec.eval().nll(z, x).mean())
    assert after < before - 10, (before, after)


def test_a_checkpoint_saved_before_the_flow_moved_loads(tmp_path):
    """Decoders written before fisher/flow.py existed keep the flow's tensors at ``scales.*`` (now
    ``net.scales.*``): they load and decode as before. A checkpoint of another architecture is refused
    in one short line, not with the hundreds of names load_state_dict lists."""
    dec = _flow()
    save_decoder(dec, tmp_path / "new")
    old = {(k[len("net."):] if k.startswith("net.") else k): v for k, v in dec.state_dict().items()}
    assert any(k.startswith("scales.") for k in old) and not any(k.startswith("net.") for k in old)
    save_decoder(dec, tmp_path / "old")
    torch.save(old, tmp_path / "old" / "weights.pt")
    loaded = load_decoder(tmp_path / "old")
    z, x = torch.randn(3, 5), torch.randint(0, 32, (3, 3, 8, 8))
    assert torch.equal(loaded.loss(z, x), dec.loss(z, x))
    other = _flow(features=4)                     # same names, other shapes
    save_decoder(other, tmp_path / "other")
    torch.save(dec.state_dict(), tmp_path / "other" / "weights.pt")
    with pytest.raises(FisherError) as e:
        load_decoder(tmp_path / "other")
    assert "of another shape, e.g. '" in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400
