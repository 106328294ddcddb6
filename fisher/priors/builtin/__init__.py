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


def package(checkpoint: str, data_dir: str, name: str, command: str, check_images: int = 1000) -> dict:
    """Copy a ``fisher train-prior`` checkpoint (its output directory, or one of the Ray checkpoints
    under ``OUT/ray/prior/`` of a run still going) into the package as ``builtin:<name>``, with a manifest:
    the exact command, the prepared data's manifest hash, epochs, the test NLL curve and the NLL of the
    first ``check_images`` test images (which the tests recompute)."""
    import torch

    from fisher import checkpoints
    from fisher.data import load_prepared
    from fisher.io import manifest_hash, read_manifest, write_manifest
    from fisher.priors import load_prior, save_prior, to_model_input
    from fisher.training import nll_sum

    from fisher.io import exists, join
    finished = exists(join(checkpoint, "manifest.json"))     # an output directory: its manifest's history and
    if finished:                                             # final metrics (a latent model's importance-sampled NLL)
        run = read_manifest(checkpoint, "train-prior")
        state = {"history": run["history"], "epoch": run["metrics"]["epoch"]}
    else:
        files = checkpoints.read_files(checkpoint, (checkpoints.WEIGHTS, checkpoints.PROGRESS, "history.json",
                                                    "metrics.json"))
        state = checkpoints.read_train_state(files, checkpoint)
    model = load_prior(checkpoint)
    out = HERE / name
    save_prior(model, out)
    data = read_manifest(data_dir, "prepare")
    test = load_prepared(data_dir, "test", limit=check_images)
    torch.manual_seed(0)                # a latent-variable prior's bound is stochastic: seeded
    with torch.no_grad():
        check = nll_sum(model, to_model_input(test["image"])) / len(test["image"])
    history = state["history"]
    last = {**history[-1], **(run["metrics"] if finished else {})}
    gain = history[-2]["test_nll_nats"] - last["test_nll_nats"] if len(history) > 1 else None
    import hashlib
    weights = (out / checkpoints.WEIGHTS).read_bytes()
    config = {"prior": type(model).registered_name, "model": json.loads((out / checkpoints.SPEC).read_text())["config"],
              "epochs": state["epoch"]}
    write_manifest(str(out), "train-prior", config, inputs={"data": manifest_hash(data)}, metrics=last,
                   history=history, weights_sha256=hashlib.sha256(weights).hexdigest(),
                   builtin={"command": command, "data": {"manifest_hash": manifest_hash(data), "config": data["config"],
                                                         "counts": data["counts"]},
                            "check": {"split": "test", "images": len(test["image"]), "nll_nats": check},
                            "last_epoch_gain_nats": gain,
                            "converged": gain is not None and gain < 0.5})
    return read_manifest(str(out))

