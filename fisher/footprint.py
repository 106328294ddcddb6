"""Memory a training run, or a pass of Fisher scores, will need, estimated before anything is allocated.

Not a paper section: the guard behind "no memory blow-ups on impossible requests" (a ``--filters`` or
``--batch-size`` no machine can hold is refused with one line, not discovered by the kernel's OOM killer
inside a Ray worker). The module is built on PyTorch's ``meta`` device (shapes, no storage) and run once
on a meta batch; every tensor a leaf submodule (a layer) outputs is counted as activation memory kept for the backward
pass, and each parameter as four float32 copies when training (weights, gradients, Adam's two moments).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fisher.errors import FisherError

OPTIMIZER_COPIES = 4     # weights, gradients, Adam's exp_avg and exp_avg_sq


def training_bytes(build: Callable[[], nn.Module], forward: Callable[[nn.Module, int], torch.Tensor],
                   batch_size: int) -> int:
    """Bytes one training process needs for the module ``build()`` makes, trained on batches of
    ``batch_size``: ``forward(module, n)`` runs it on a meta batch of ``n``. The activations count 0 when
    the architecture cannot run on the meta device (the estimate is then left to the allocator); a
    :class:`~fisher.errors.FisherError` the module raises (images of a size it was not built for) is
    passed on, so the stage refuses them before it starts."""
    weights, _, per_image = _measure(build, forward)
    return OPTIMIZER_COPIES * weights + batch_size * per_image


def scores_bytes(build: Callable[[], nn.Module], forward: Callable[[nn.Module, int], torch.Tensor],
                 chunk_size: int) -> int:
    """Bytes :func:`fisher.scores.fisher_scores` needs for one chunk of ``chunk_size`` images, beside the
    projections' own matrices: the weights, the chunk's activations (kept for the pass back to the layer
    outputs) and the per-image gradient block of the largest parameter twice (a rule's product and the
    block in feature order). ``build`` and ``forward`` as in :func:`training_bytes`. A lower bound, as that
    one is: only the outputs of layers are seen, not the tensors a model makes between them (the 20 M-parameter
    Pyramid: 1.4 GiB estimated at chunk 32, 5.9 GB measured by ``benchmarks/bench_scores.py``)."""
    weights, largest, per_image = _measure(build, forward)
    return weights + chunk_size * (per_image + 2 * largest)


def _measure(build, forward) -> tuple[int, int, int]:
    """(bytes of the weights, of the largest parameter, of the layers' outputs for one image)."""
    outputs = []

    def count(_module, _inputs, output):
        outputs.append(sum(t.numel() * t.element_size() for t in _tensors(output)))

    sizes = []
    try:
        with torch.device("meta"):
            module = build()
            sizes = [p.numel() * p.element_size() for p in module.parameters()]
            hooks = [m.register_forward_hook(count) for m in module.modules() if not any(m.children())]
            forward(module, 1)
            for h in hooks:
                h.remove()
    except FisherError:
        raise
    except Exception:           # noqa: BLE001  an op without a meta kernel: no estimate
        outputs = []
    return sum(sizes), max(sizes, default=0), sum(outputs)


def _tensors(output):
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, (tuple, list)):
        for o in output:
            yield from _tensors(o)
