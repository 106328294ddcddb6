"""Loading model weights safely: plain state dicts of tensors only (``weights_only=True``),
checked against the architecture and for NaN/Inf, with one-line errors naming the file."""
from __future__ import annotations

import io

import torch
from torch import nn

from fisher.io import FisherError, exists, join, read_bytes


def read_files(directory: str, names) -> dict[str, bytes]:
    """The files ``names`` present in checkpoint ``directory`` (local path or URI)."""
    directory = str(directory)
    return {n: read_bytes(join(directory, n)) for n in names if exists(join(directory, n))}


def load_weights(module: nn.Module, data: bytes | None, where: str, config_name: str, retrain: str,
                 map_location="cpu") -> nn.Module:
    """Load the state dict in ``data`` (the bytes of ``where``) into ``module``; returns it in eval mode."""
    if data is None:
        raise FisherError(f"{where}: missing; the checkpoint is incomplete, {retrain}")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # a pickle carrying code, a corrupt file, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's first line suggests weights_only=False; the line naming the refused global is the reason
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
        raise FisherError(f"{where}: not a plain weights file ({reason[:200]}); nothing in it was run, only "
                          "state dicts of tensors are loaded: use weights written by `fisher`") from e
    if not isinstance(state, dict):
        raise FisherError(f"{where}: not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise FisherError(f"{where}: does not match the architecture in {config_name} "
                          f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from e
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FisherError(f"{where}: tensor '{name}' holds NaN or Inf; {retrain} or use an earlier checkpoint")
    return module.eval()
