"""Reproducible per-image noise: one seeded generator per row of a batch.

Whatever samples (a decoder drawing p(x | z), a flow's dequantization of a test image) draws each
image's noise from a generator keyed by a seed, a salt and the bytes of that image's row, so the same
row gets the same noise whatever batch it comes in, and a run's strips, FIDs and test bounds repeat.
"""
from __future__ import annotations

import hashlib

import torch


def row_generators(z: torch.Tensor, seed: int, salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per row of ``z``, seeded by ``seed``, ``salt`` and the row's float32 bytes."""
    rows = z.detach().to("cpu", torch.float32).contiguous().numpy()
    gens = []
    for row in rows:
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=f"{seed}:{salt}".encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
    return gens
