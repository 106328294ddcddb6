"""Search spaces as data (JSON files beside this module), loaded and validated here.

``paper_grid`` is the paper's projection density × dimension grid (sec. 5.1, Figure 3a): densities
0.001, 0.01, 0.1, 1 × dims 64, 256, 1024. :func:`load` reads a space by name; :func:`load_grid` reads
a grid by name or from a JSON file (local path or URI) and checks it, so ``fisher sweep`` and
``fisher run`` refuse a bad grid with the same one-line message before any work.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fisher.io import FisherError, exists, read_bytes


def load(name: str) -> dict:
    """The search space ``name`` (a JSON file in this package)."""
    path = Path(__file__).with_name(f"{name}.json")
    if not path.exists():
        available = sorted(p.stem for p in Path(__file__).parent.glob("*.json"))
        raise FileNotFoundError(f"no search space '{name}' (have: {', '.join(available)})")
    return json.loads(path.read_text())


def load_grid(name: str, flag: str = "--grid") -> dict:
    """The density × dimension grid ``name`` (a name of this package or a JSON file), checked.

    Returns the space with ``dim`` as positive ints and ``density`` as floats in (0, 1] or None
    (null/'auto' in the file: 1/sqrt(n)), other keys (``seed``, ``source``) unchanged. Raises
    :class:`fisher.io.FisherError` with a one-line message starting ``"<flag> <name>: "``.
    """
    if name.endswith(".json") or "/" in name or os.sep in name:
        if not exists(name):
            raise FisherError(f"{flag} {name}: file not found; pass a tune_spaces name or a JSON file "
                              "with 'density' and 'dim' lists")
        try:
            space = json.loads(read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FisherError(f"{flag} {name}: not valid JSON ({e})") from e
    else:
        try:
            space = load(name)
        except FileNotFoundError as e:
            raise FisherError(f"{flag} {name}: {e}; or pass a JSON file with 'density' and 'dim' lists") from e
    return check_grid(space, f"{flag} {name}")


def check_grid(space, where: str = "grid") -> dict:
    """``space`` with its ``dim`` and ``density`` lists checked and normalised (see :func:`load_grid`);
    errors are :class:`fisher.io.FisherError` starting ``"<where>: "``."""
    if not isinstance(space, dict) or not isinstance(space.get("density"), list) or \
            not isinstance(space.get("dim"), list) or not space["density"] or not space["dim"]:
        raise FisherError(f"{where}: needs non-empty 'density' and 'dim' lists")
    dims, dens = [], []
    for v in space["dim"]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FisherError(f"{where}: dim {v!r} is not a positive integer")
        dims.append(v)
    for v in space["density"]:
        if v is None or v == "auto":
            dens.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1:
            dens.append(float(v))
        else:
            raise FisherError(f"{where}: density {v!r} is not in (0, 1] (or null/'auto' for 1/sqrt(n))")
    if len(set(dims)) < len(dims) or len(set(dens)) < len(dens):
        raise FisherError(f"{where}: repeated dim or density values")
    return {**space, "dim": dims, "density": dens}
