"""Prior and decoder training steps refuse a non-finite loss before stepping (nothing NaN is published)."""
import pytest
import torch

from fisher.decoders import build_decoder
from fisher.errors import FisherError
from fisher.priors import build_prior
from fisher.training import PriorTrainConfig, train_step


def test_prior_step_stops_on_a_non_finite_loss():
    m = build_prior("pixelcnn", n_layers=1, filters=4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.randint(0, 2, (2, 1, 5, 5))
    assert train_step(m, opt, x) > 0
    with torch.no_grad():
        m.output.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(FisherError, match="training loss became nan; lower --lr"):
        train_step(m, opt, x)
    assert torch.equal(before["hidden_layers.0.weight"], m.state_dict()["hidden_layers.0.weight"])   # no step taken


def test_decoder_step_stops_on_a_non_finite_loss():
    d = build_decoder("conv", 4, (8, 8, 1), 2, base_channels=4)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    z, x = torch.randn(2, 4), torch.randint(0, 2, (2, 1, 8, 8))
    with torch.no_grad():
        d.linear.bias.fill_(float("inf"))
    with pytest.raises(FisherError, match="training loss became"):
        d.train_step(opt, z, x)


def test_train_config_builds_any_registered_prior():
    cfg = PriorTrainConfig(prior="gated", model={"n_layers": 1, "filters": 4, "kernel_size": 3})
    assert type(cfg.build()).registered_name == "gated"
    assert PriorTrainConfig.from_dict(cfg.to_dict()) == cfg
