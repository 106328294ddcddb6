"""Priors trained by this project and shipped with the package (``--prior builtin:<name>``).

Each is a directory here holding a prior checkpoint (``weights.pt`` + ``module.json``, see
:mod:`fisher.checkpoints`) and the ``manifest.json`` of the ``fisher train-prior`` run that made it:
the exact command, the prepared data's manifest hash, the epochs, the test NLL curve, and
``builtin.check``: the NLL of a fixed slice of the real test images, which
``tests/fisher/priors/test_builtin.py`` recomputes.
"""
from __future__ import annotations

import json
from pathlib import Path

from fisher.errors import FisherError

PREFIX = "builtin:"
HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.name for p in HERE.iterdir() if (p / "manifest.json").exists())


def location(path) -> str:
    """The directory of ``builtin:<name>``; any other path or URI unchanged."""
    path = str(path)
    if not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    if name not in names():
        raise FisherError(f"{path}: no such builtin prior (have {', '.join(PREFIX + n for n in names()) or 'none'}); "
                          "`fisher priors` lists them")
    return str(HERE / name)


def describe() -> list[dict]:
    """One summary per builtin prior: name, architecture, data, epochs, test NLL, command."""
    out = []
    for name in names():
        m = json.loads((HERE / name / "manifest.json").read_text())
        spec = json.loads((HERE / name / "module.json").read_text())
        out.append({"name": PREFIX + name, "arch": spec["arch"], "config": spec["config"],
                    "epochs": m["metrics"]["epoch"], "test_nll_nats": m["metrics"]["test_nll_nats"],
                    "test_bits_per_dim": m["metrics"]["test_bits_per_dim"],
                    "command": m.get("builtin", {}).get("command"), "data": m.get("builtin", {}).get("data")})
    return out
