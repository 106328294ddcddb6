"""Fitting a prior p_θ(x) by maximum likelihood (paper sec. 5.2: Adam, lr 1e-3, batch 128).

Framework-free pieces the Ray Train loop calls: the config, one optimisation step, evaluation
and the checkpoint state; they work for every registered prior (:mod:`fisher.priors`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from fisher import checkpoints
from fisher.errors import FisherError
from fisher.priors import PRIORS, Prior


@dataclass
class PriorTrainConfig:
    """Paper defaults: Adam 1e-3, batch 128 (sec. 5.2, appendix 7.1). ``prior`` is a registry name and
    ``model`` that family's config (a dict of its dataclass fields, or the dataclass)."""
    model: dict = field(default_factory=dict)
    prior: str = "pixelcnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, dict):
            self.model = asdict(self.model)

    def build(self) -> Prior:
        return PRIORS.build(self.prior, **self.model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorTrainConfig":
        return cls(**d)


def train_step(model: Prior, opt: torch.optim.Optimizer, x: torch.Tensor,
               net: torch.nn.Module | None = None) -> float:
    """One Adam step on the mean NLL of batch ``x``; returns that NLL (nats/image).

    ``net`` is the module to call for the head's parameters when it wraps ``model``
    (DistributedDataParallel all-reduces gradients in its backward pass). A non-finite loss stops
    training before the step (nothing non-finite is ever published).
    """
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = -model.log_prob_from_output((net or model)(x), x).mean()
    if not torch.isfinite(loss):
        raise FisherError(f"the training loss became {float(loss)}; lower --lr and rerun with a new --out")
    loss.backward()
    opt.step()
    return float(loss)


@torch.no_grad()
def nll_sum(model: Prior, x: torch.Tensor) -> float:
    """Summed NLL (nats) of images ``x`` under the model, in eval mode."""
    model.eval()
    return float(-model.log_prob(x).sum())


def nll_metrics(total_nats: float, count: int, dims: int) -> dict:
    """NLL in nats/image (the paper's MNIST unit) and bits/dim (CelebA's)."""
    nats = total_nats / max(count, 1)
    return {"nll_nats": nats, "bits_per_dim": nats / (dims * math.log(2))}


def state_bytes(model: Prior, opt: torch.optim.Optimizer, epoch: int, history: list | None = None,
                metrics: dict | None = None) -> dict[str, bytes]:
    """The resumable checkpoint (:func:`fisher.checkpoints.train_state_files`) of a prior."""
    return checkpoints.train_state_files(model, "prior", opt, epoch, history or [], metrics)


def load_state(model: Prior, opt: torch.optim.Optimizer | None, files: dict[str, bytes]) -> int:
    """Restore from :func:`state_bytes` output; returns the number of finished epochs."""
    state = checkpoints.read_train_state(files)
    model.load_state_dict({k: v for k, v in state["weights"].items() if k in model.state_dict()})
    if opt is not None and state["optimizer"] is not None:
        opt.load_state_dict(state["optimizer"])
    return state["epoch"]
