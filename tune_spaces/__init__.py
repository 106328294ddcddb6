"""Search spaces as data (JSON files beside this module), read by the sweep stage."""
from __future__ import annotations

import json
from pathlib import Path


def load(name: str) -> dict:
    """The search space ``name`` (a JSON file in this package)."""
    path = Path(__file__).with_name(f"{name}.json")
    if not path.exists():
        available = sorted(p.stem for p in Path(__file__).parent.glob("*.json"))
        raise FileNotFoundError(f"no search space '{name}' (have: {', '.join(available)})")
    return json.loads(path.read_text())
