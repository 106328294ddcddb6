"""Likelihood heads (fisher.likelihoods): normalisation, edge bins, mean, mode, sampling."""
import math

import pytest
import torch

from fisher.errors import FisherError
from fisher.likelihoods import Bernoulli, Categorical, DiscretizedLogisticMixture, likelihood_for

HEADS = [Bernoulli(), Categorical(5), DiscretizedLogisticMixture(32, 3), DiscretizedLogisticMixture(4, 1)]


def _params(head, b=2, c=3, h=4, w=5, scale=2.0):
    g = torch.Generator().manual_seed(0)
    shape = (b, c, h, w) if head.outputs == 1 else (b, c, head.outputs, h, w)
    return torch.randn(shape, generator=g) * scale


@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{type(h).__name__}{h.levels}")
def test_probabilities_sum_to_one_and_match_log_prob(head):
    p = _params(head)
    lp = head.log_probs(p)
    assert lp.shape == (2, 3, head.levels, 4, 5)
    assert float((lp.exp().sum(2) - 1).abs().max()) < 1e-5
    x = torch.randint(0, head.levels, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(head.log_prob(p, x), lp.gather(2, x.unsqueeze(2)).squeeze(2), atol=1e-6)
    assert torch.allclose(head.nll(p, x), -head.log_prob(p, x))
    values = torch.arange(head.levels) / (head.levels - 1)
    assert torch.allclose(head.mean(p), (lp.exp() * values.view(1, 1, -1, 1, 1)).sum(2), atol=1e-6)
    assert torch.equal(head.mode(p), lp.argmax(2))


def test_logistic_mixture_edges_and_a_sharp_component():
    """Edge bins take the tails: a logistic centred far below -1 puts all mass on value 0, far above 1
    on the top value; a sharp one centred on a bin puts (almost) all mass there."""
    head = DiscretizedLogisticMixture(32, 1)
    def params(mu, log_s):
        return torch.tensor([0.0, mu, log_s]).view(1, 1, 3, 1, 1)
    assert float(head.log_probs(params(-50.0, 0.0))[0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(head.log_probs(params(50.0, 0.0))[0, 0, 31]) == pytest.approx(0.0, abs=1e-6)
    k = 13
    centre = 2 * k / 31 - 1
    probs = head.log_probs(params(centre, -7.0)).exp()[0, 0, :, 0, 0]
    assert float(probs[k]) > 0.999 and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    # a broad logistic: every bin gets the mass of its interval under the CDF
    sig = lambda t: 1 / (1 + math.exp(-t))
    probs = head.log_probs(params(0.1, math.log(0.3))).exp()[0, 0, :, 0, 0].double()
    edges = [-math.inf] + [2 * (j + 0.5) / 31 - 1 for j in range(31)] + [math.inf]
    cdf = [0.0 if e == -math.inf else 1.0 if e == math.inf else sig((e - 0.1) / 0.3) for e in edges]
    expected = torch.tensor([cdf[j + 1] - cdf[j] for j in range(32)], dtype=torch.float64)
    assert torch.allclose(probs, expected, atol=1e-5)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{type(h).__name__}{h.levels}")
def test_sampling_follows_the_probabilities(head):
    p = _params(head, b=1, c=1, h=1, w=1, scale=1.0).expand(*((20000,) + _params(head, 1, 1, 1, 1).shape[1:]))
    draws = head.sample(p, torch.Generator().manual_seed(2))
    assert draws.shape == (20000, 1, 1, 1) and 0 <= int(draws.min()) and int(draws.max()) < head.levels
    freq = torch.bincount(draws.flatten(), minlength=head.levels).double() / 20000
    probs = head.log_probs(p[:1]).exp()[0, 0, :, 0, 0].double()
    assert float((freq - probs).abs().max()) < 0.02


def test_factory_and_shape_errors():
    assert isinstance(likelihood_for(2), Bernoulli) and isinstance(likelihood_for(32), Categorical)
    assert isinstance(likelihood_for(32, "logistic_mixture", components=5), DiscretizedLogisticMixture)
    with pytest.raises(FisherError, match="do not match"):
        Categorical(5).log_prob(torch.zeros(2, 1, 4, 3, 3), torch.zeros(2, 1, 3, 3, dtype=torch.long))
    with pytest.raises(FisherError, match="unknown likelihood"):
        likelihood_for(4, "gaussian")
