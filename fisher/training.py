"""Fitting the prior p_θ(x) by maximum likelihood (paper sec. 4.2: Adam, lr 1e-3,
batch 128). Framework-free pieces the Ray Train loop calls: the config, one
optimisation step, evaluation, and the checkpoint state."""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field

import torch

from fisher.models import WEIGHTS, PixelCNN, PixelCNNConfig, prior_files


@dataclass
class PriorTrainConfig:
    """Paper defaults: Adam 1e-3, batch 128 (sec. 4.2, appendix 7.1)."""
    model: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorTrainConfig":
        d = dict(d)
        return cls(model=PixelCNNConfig(**d.pop("model")), **d)


def train_step(model: PixelCNN, opt: torch.optim.Optimizer, x: torch.Tensor,
               net: torch.nn.Module | None = None) -> float:
    """One Adam step on the mean NLL of batch ``x``; returns that NLL (nats/image).

    ``net`` is the module to call for the logits when it wraps ``model``
    (DistributedDataParallel all-reduces gradients in its backward pass).
    """
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = -model.log_prob_from_logits((net or model)(x), x).mean()
    loss.backward()
    opt.step()
    return float(loss)


@torch.no_grad()
def nll_sum(model: PixelCNN, x: torch.Tensor) -> float:
    """Summed NLL (nats) of images ``x`` under the model, in eval mode."""
    model.eval()
    return float(-model.log_prob(x).sum())


def nll_metrics(total_nats: float, count: int, dims: int) -> dict:
    """NLL in nats/image (the paper's MNIST unit) and bits/dim (CelebA's)."""
    nats = total_nats / max(count, 1)
    return {"nll_nats": nats, "bits_per_dim": nats / (dims * math.log(2))}


def state_bytes(model: PixelCNN, opt: torch.optim.Optimizer, epoch: int) -> dict[str, bytes]:
    """Checkpoint files: weights and optimizer as plain tensors, progress and config as JSON."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return {**prior_files(model), "optimizer.pt": buf.getvalue(),
            "progress.json": json.dumps({"epoch": epoch}).encode()}


def load_state(model: PixelCNN, opt: torch.optim.Optimizer | None, files: dict[str, bytes]) -> int:
    """Restore from :func:`state_bytes` output; returns the number of finished epochs."""
    model.load_state_dict(torch.load(io.BytesIO(files[WEIGHTS]), weights_only=True))
    if opt is not None and "optimizer.pt" in files:
        opt.load_state_dict(torch.load(io.BytesIO(files["optimizer.pt"]), weights_only=True))
    return int(json.loads(files["progress.json"])["epoch"])
