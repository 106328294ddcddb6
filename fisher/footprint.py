"""Memory a training run will need, estimated before anything is allocated.

Not a paper section: the guard behind "no memory blow-ups on impossible requests" (a ``--filters`` or
``--batch-size`` no machine can hold is refused with one line, not discovered by the kernel's OOM killer
inside a Ray worker). The module is built on PyTorch's ``meta`` device (shapes, no storage) and run once
on a meta batch; every tensor a leaf submodule (a layer) outputs is counted as activation memory kept for the backward
pass, and each parameter as four float32 copies (weights, gradients, Adam's two moments).
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
    ``batch_size``: ``forward(module, n)`` runs it on a meta batch of ``n``. Returns 0 when the
    architecture cannot run on the meta device (the estimate is then left to the allocator); a
    :class:`~fisher.errors.FisherError` the module raises (images of a size it was not built for) is
    passed on, so the stage refuses them before it starts."""
    outputs = []

    def count(_module, _inputs, output):
        outputs.append(sum(t.numel() * t.element_size() for t in _tensors(output)))

    try:
        with torch.device("meta"):
            module = build()
            hooks = [m.register_forward_hook(count) for m in module.modules() if not any(m.children())]
            forward(module, 1)
            for h in hooks:
                h.remove()
    except FisherError:
        raise
    except Exception:           # noqa: BLE001  an op without a meta kernel: no estimate
        return 0
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return OPTIMIZER_COPIES * weights + batch_size * sum(outputs)


def _tensors(output):
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, (tuple, list)):
        for o in output:
            yield from _tensors(o)
