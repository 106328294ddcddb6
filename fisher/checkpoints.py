"""One checkpoint format for every trained module, and one resumable training state.

A module checkpoint is a directory (local path or URI) with

* ``weights.pt`` — a plain state dict of tensors, loaded with ``torch.load(weights_only=True)``:
  a pickle carrying code is refused, never run; masks and other non-persistent buffers are not
  stored but rebuilt from the architecture; every float tensor is checked for NaN/Inf;
* ``module.json`` — ``{"format": "fisher-module/1", "family": "prior" | "decoder", "arch": <registry
  name>, "args": {...}, "config": {...}}``: the family's registry rebuilds the module as
  ``build(arch, *args, **config)`` (decoders' args are z_dim, image_shape, levels; priors have none).

Directories written before this format (``model.json`` for priors, ``decoder.json`` for decoders)
load the same way. A training checkpoint adds ``optimizer.pt`` and ``progress.json`` (finished
epochs and the metrics of every epoch), see :func:`train_state_files` / :func:`read_train_state`;
every trainer (priors, decoders, sweep cells) writes and resumes from it.
"""
from __future__ import annotations

import importlib
import io
import json
from dataclasses import asdict, is_dataclass

import torch
from torch import nn

from fisher.errors import FisherError
from fisher.io import atomic_write_bytes, exists, join, read_bytes

WEIGHTS, SPEC, OPTIMIZER, PROGRESS, METRICS = "weights.pt", "module.json", "optimizer.pt", "progress.json", "metrics.json"
FORMAT = "fisher-module/1"
MAX_SIZE = 1 << 16                  # any integer in a module description: layers, filters, kernel, z_dim, ...
MAX_PARAMETERS = 1 << 30            # 4 GiB of float32 weights
LEGACY_SPEC = {"prior": "model.json", "decoder": "decoder.json"}           # checkpoints of fisher-ray 0.1
FAMILIES = {"prior": ("fisher.priors", "PRIORS", "fisher train-prior", "rerun `fisher train-prior`"),
            "decoder": ("fisher.decoders", "DECODERS", "fisher train-decoder", "retrain the decoder")}


def registry(family: str):
    module, name = FAMILIES[family][:2]
    return getattr(importlib.import_module(module), name)


def _retrain(family: str) -> str:
    return FAMILIES[family][3]


# ---------------------------------------------------------------- writing

def module_spec(module: nn.Module, family: str) -> dict:
    """The JSON description of ``module``: family, registry name, constructor args and config."""
    config = getattr(module, "config", None)
    config = asdict(config) if is_dataclass(config) else dict(config or {})
    args = module.checkpoint_args() if hasattr(module, "checkpoint_args") else {}
    return {"format": FORMAT, "family": family, "arch": type(module).registered_name, "args": args, "config": config}


def weights_bytes(module: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    return buf.getvalue()


def module_files(module: nn.Module, family: str) -> dict[str, bytes]:
    """A checkpoint's files: weights as a plain state dict of tensors, the description as JSON."""
    return {WEIGHTS: weights_bytes(module), SPEC: json.dumps(module_spec(module, family), indent=2).encode()}


def save_module(module: nn.Module, family: str, directory) -> None:
    """Write :func:`module_files` into ``directory`` (local path or URI), atomically per file."""
    for name, data in module_files(module, family).items():
        atomic_write_bytes(join(str(directory), name), data)


# ---------------------------------------------------------------- reading

def read_spec(files: dict[str, bytes], family: str, where: str = "checkpoint") -> dict:
    """The checkpoint's description in the current format (older ``model.json`` / ``decoder.json`` converted)."""
    legacy = LEGACY_SPEC[family]
    name = SPEC if SPEC in files else legacy if legacy in files else None
    if name is None:
        raise FisherError(f"{where}/{SPEC}: missing; pass a {family} checkpoint directory made by "
                          f"`{FAMILIES[family][2]}`")
    try:
        spec = json.loads(files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FisherError(f"{where}/{name}: not valid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise FisherError(f"{where}/{name}: not a {family} description (a JSON object); {_retrain(family)}")
    if name == legacy:
        spec = _from_legacy(spec, family)
    if spec.get("family") != family:
        raise FisherError(f"{where}/{name}: a {spec.get('family')!r} checkpoint, not a {family}; "
                          f"pass a {family} checkpoint directory")
    if not isinstance(spec.get("args", {}), dict) or not isinstance(spec.get("config", {}), dict):
        raise FisherError(f"{where}/{name}: 'args' and 'config' must be JSON objects; {_retrain(family)}")
    spec.setdefault("args", {})
    spec.setdefault("config", {})
    spec["file"] = name
    return spec


def _from_legacy(old: dict, family: str) -> dict:
    if family == "prior":
        return {"format": "fisher-ray 0.1", "family": "prior", "arch": old.get("arch"),
                "args": {}, "config": {k: v for k, v in old.items() if k != "arch"}}
    return {"format": "fisher-ray 0.1", "family": "decoder", "arch": old.get("arch"),
            "args": {k: old[k] for k in ("z_dim", "image_shape", "levels") if k in old},
            "config": old.get("config") or {}}


def build_from_spec(spec: dict, family: str, where: str = "checkpoint") -> nn.Module:
    """A fresh module of the architecture ``spec`` describes (weights not loaded)."""
    reg = registry(family)
    arg_names = getattr(reg, "arg_names", ())
    missing = [a for a in arg_names if a not in spec["args"]]
    if missing:
        raise FisherError(f"{where}/{spec['file']}: missing or incomplete ({', '.join(missing)}); "
                          f"pass a {family} checkpoint directory")
    for part in ("args", "config"):             # sizes: no 200 000 layers (negative ones: the config's own check)
        for key, value in spec[part].items():
            for x in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(x, int) and not isinstance(x, bool) and x > MAX_SIZE:
                    raise FisherError(f"{where}/{spec['file']}: {part}.{key} = {value!r} is above {MAX_SIZE}; "
                                      f"{_retrain(family)}")
    args = [spec["args"][a] for a in arg_names]
    try:
        with torch.device("meta"):              # count the parameters without allocating them
            count = sum(p.numel() for p in reg.build(spec["arch"], *args, **spec["config"]).parameters())
    except Exception:                           # noqa: BLE001  an architecture that cannot be built on meta
        count = 0
    if count > MAX_PARAMETERS:
        raise FisherError(f"{where}/{spec['file']}: describes {count:,} parameters, more than {MAX_PARAMETERS:,}; "
                          f"{_retrain(family)}")
    try:
        return reg.build(spec["arch"], *args, **spec["config"])
    except FisherError as e:
        raise FisherError(f"{where}/{spec['file']}: {e}") from e
    except (TypeError, ValueError, RuntimeError) as e:     # a field of the wrong type, a size torch refuses
        raise FisherError(f"{where}/{spec['file']}: cannot build '{spec.get('arch')}' from it "
                          f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); {_retrain(family)}") from e


def load_weights(module: nn.Module, data: bytes | None, where: str, config_name: str, retrain: str,
                 map_location="cpu") -> nn.Module:
    """Load the state dict in ``data`` (the bytes of ``where``) into ``module``; returns it in eval mode."""
    if data is None:
        raise FisherError(f"{where}: missing; the checkpoint is incomplete, {retrain}")
    state = _plain_state(data, where)
    rebuilt = {f"{m}.{b}" if m else b for m, mod in module.named_modules() for b in mod._non_persistent_buffers_set}
    state = {k: v for k, v in state.items() if k not in rebuilt}      # masks: from the architecture, never a file
    try:                      # not strict: the names that differ are listed below, a few, on one line
        result = module.load_state_dict(state, strict=False)
        mismatch = _mismatch(module, state, result.missing_keys, result.unexpected_keys)
    except RuntimeError as e:  # shapes differ (raised whatever ``strict`` is)
        mismatch = _mismatch(module, state, [], []) or str(e).splitlines()[-1].strip()[:200]
    if mismatch:
        raise FisherError(f"{where}: does not match the architecture in {config_name} ({mismatch}); {retrain}")
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FisherError(f"{where}: tensor '{name}' holds NaN or Inf; {retrain} or use an earlier checkpoint")
    return module.to(map_location).eval()


def _mismatch(module: nn.Module, state: dict, missing: list, unexpected: list) -> str:
    """What differs between ``state`` and ``module``'s own tensors, in a few words ('' when they match):
    how many names are missing and unexpected, with the first of each, and the first shape that differs.
    (``load_state_dict`` lists every key, hundreds for a flow: no line for a terminal.)"""
    parts = [f"{len(keys)} {what} tensor(s), e.g. '{keys[0]}'"
             for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
    own = module.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} of another shape, e.g. '{k}' {list(got)} where the architecture has {list(want)}")
    return "; ".join(parts)


def _plain_state(data: bytes, where: str) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle carrying code, a corrupt file, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's first line suggests weights_only=False; the line naming the refused global is the reason
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
        raise FisherError(f"{where}: not a plain weights file ({reason[:200]}); nothing in it was run, only "
                          "state dicts of tensors are loaded: use weights written by `fisher`") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FisherError(f"{where}: not a state dict of tensors")
    return state


def module_from_files(files: dict[str, bytes], family: str, where: str = "checkpoint", map_location="cpu") -> nn.Module:
    """Rebuild a module from checkpoint files; never unpickles code. Eval mode."""
    spec = read_spec(files, family, where)
    module = build_from_spec(spec, family, where)
    return load_weights(module, files.get(WEIGHTS), f"{where}/{WEIGHTS}", spec["file"], _retrain(family), map_location)


def read_files(directory, names) -> dict[str, bytes]:
    """The files ``names`` present in checkpoint ``directory`` (local path or URI)."""
    directory = str(directory)
    return {n: read_bytes(join(directory, n)) for n in names if exists(join(directory, n))}


def load_module(directory, family: str, map_location="cpu") -> nn.Module:
    """Load a module saved by :func:`save_module` (or an older checkpoint) from a local path or URI."""
    files = read_files(directory, (WEIGHTS, SPEC, LEGACY_SPEC[family]))
    return module_from_files(files, family, str(directory), map_location)


def spec_file(directory, family: str) -> str | None:
    """The description file present in ``directory`` (``module.json``, or an older name), or None."""
    for name in (SPEC, LEGACY_SPEC[family]):
        if exists(join(str(directory), name)):
            return name
    return None


# ---------------------------------------------------------------- training state

def train_state_files(module: nn.Module, family: str, optimizer, epoch: int, history: list[dict],
                      metrics: dict | None = None) -> dict[str, bytes]:
    """A resumable training checkpoint: module files, optimizer state, progress (epochs and history)."""
    files = module_files(module, family)
    opt = optimizer if isinstance(optimizer, dict) else {} if optimizer is None else optimizer.state_dict()
    buf = io.BytesIO()
    torch.save(opt, buf)
    files[OPTIMIZER] = buf.getvalue()
    files[PROGRESS] = json.dumps({"epoch": int(epoch), "history": list(history)}).encode()
    if metrics is not None:
        files[METRICS] = json.dumps(metrics).encode()
    return files


def read_train_state(files: dict[str, bytes], where: str = "checkpoint") -> dict:
    """{"weights", "optimizer", "epoch", "history"} of :func:`train_state_files` output (older checkpoints:
    ``history.json`` beside ``progress.json``)."""
    if WEIGHTS not in files or PROGRESS not in files:
        raise FisherError(f"{where}: not a training checkpoint (needs {WEIGHTS} and {PROGRESS})")
    progress = json.loads(files[PROGRESS])
    history = progress.get("history")
    if history is None and "history.json" in files:
        history = json.loads(files["history.json"])
    return {"weights": _plain_state(files[WEIGHTS], f"{where}/{WEIGHTS}"),
            "optimizer": (torch.load(io.BytesIO(files[OPTIMIZER]), weights_only=True) if OPTIMIZER in files else None),
            "epoch": int(progress["epoch"]), "history": list(history or [])}
