"""PixelCNN: causality (autoregressive ordering), normalisation, checkpoints."""
import itertools

import pytest
import torch

from fisher.io import FisherError
from fisher.models import PixelCNN, load_prior, save_prior


def test_binary_log_prob_normalises():
    torch.manual_seed(0)
    m = PixelCNN(n_layers=2, filters=4, kernel_size=3).eval()
    xs = torch.tensor(list(itertools.product([0, 1], repeat=9))).view(-1, 1, 3, 3)
    total = torch.logsumexp(m.log_prob(xs), 0)
    assert float(total) == pytest.approx(0.0, abs=1e-5)


def test_rgb_log_prob_normalises():
    torch.manual_seed(0)
    m = PixelCNN(channels=3, levels=3, n_layers=2, filters=6, kernel_size=3).eval()
    xs = torch.tensor(list(itertools.product(range(3), repeat=6))).view(-1, 3, 1, 2)
    assert float(torch.logsumexp(m.log_prob(xs), 0)) == pytest.approx(0.0, abs=1e-5)


def test_causality_rgb():
    """Logits for sub-pixel (c, y, x) depend only on earlier pixels and earlier channels."""
    torch.manual_seed(0)
    m = PixelCNN(channels=3, levels=4, n_layers=3, filters=6, kernel_size=5).eval()
    x = torch.randint(0, 4, (1, 3, 6, 6))
    y0, x0 = 3, 2
    order = lambda c, y, xx: (y * 6 + xx) * 3 + c
    for c in range(3):
        xin = m.scale(x).requires_grad_()
        h = xin
        for layer in m.hidden_layers:
            h = torch.relu(layer(h))
        out = m.output(h).view(1, 3, 4, 6, 6)
        grad = torch.autograd.grad(out[0, c, :, y0, x0].sum(), xin)[0][0]
        for cc, yy, xx in itertools.product(range(3), range(6), range(6)):
            if order(cc, yy, xx) >= order(c, y0, x0):
                assert grad[cc, yy, xx] == 0, (c, cc, yy, xx)
        assert grad.abs().sum() > 0


def test_checkpoint_roundtrip_and_rejections(tmp_path):
    m = PixelCNN(n_layers=1, filters=4)
    save_prior(m, tmp_path / "ok")
    m2 = load_prior(tmp_path / "ok")
    x = torch.randint(0, 2, (2, 1, 8, 8))
    assert torch.equal(m.eval().log_prob(x), m2.log_prob(x))
    # wrong architecture for the weights
    save_prior(PixelCNN(n_layers=2, filters=4), tmp_path / "bad")
    (tmp_path / "bad" / "module.json").write_text((tmp_path / "ok" / "module.json").read_text())
    with pytest.raises(FisherError, match="does not match"):
        load_prior(tmp_path / "bad")
    # a pickle that would run code is refused
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "ok" / "weights.pt")
    with pytest.raises(FisherError, match="not a plain weights file"):
        load_prior(tmp_path / "ok")
