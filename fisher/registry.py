"""Name → (class, config dataclass) for every model family: priors, decoders, embedding kinds.

A family registers each architecture once::

    PRIORS = Registry("prior", Prior)

    @PRIORS.register("pixelcnn", PixelCNNConfig)
    class PixelCNN(Prior): ...

and everything else (stages, checkpoint loading, reports) looks architectures up by name and never
imports a family module. ``build(name, *args, **config)`` validates ``config`` against the
architecture's dataclass (unknown fields, wrong types and the dataclass's own checks become one
:class:`~fisher.errors.FisherError` line) and calls ``cls(*args, **fields)``. A class registered
without a config dataclass gets one derived from its constructor's keyword parameters.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass

from fisher.errors import FisherError


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: type          # a dataclass: the architecture's options, defaults from the paper
    n_args: int           # leading positional arguments that are not options (decoders: z_dim, image_shape, levels)

    def fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.config))


def _derived_config(cls: type, name: str, n_args: int) -> type:
    """A dataclass of ``cls.__init__``'s parameters after the first ``n_args`` (each needs a default)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + n_args:]
    spec = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(f"{name}: constructor parameter '{p.name}' needs a default to be an option")
        ann = p.annotation if p.annotation is not p.empty else type(p.default)
        spec.append((p.name, ann, dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", spec)


def _check_type(value, ann) -> bool:
    """Loose check of a JSON/CLI value against a field annotation (int, float, bool, str, Optional, list)."""
    if isinstance(ann, str):
        ann = {"int": int, "float": float, "bool": bool, "str": str}.get(ann.replace(" | None", ""), object)
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin in (list, tuple) or ann in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


class Registry:
    """Registered architectures of one family (see the module docstring)."""

    def __init__(self, family: str, base: type, arg_names: tuple[str, ...] = (), base_name: str | None = None):
        self.family, self.base = family, base
        self.base_name = base_name or f"{base.__module__}.{base.__name__}"
        self.arg_names, self.n_args = tuple(arg_names), len(arg_names)   # constructor arguments that are not options
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None):
        """Class decorator: add ``cls`` under ``name`` with its config dataclass."""
        def add(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.family} {name!r}: {getattr(cls, '__name__', cls)} must subclass "
                                f"{self.base_name}")
            cfg = config or _derived_config(cls, name, self.n_args)
            if not dataclasses.is_dataclass(cfg):
                raise TypeError(f"{self.family} {name!r}: config {cfg!r} is not a dataclass")
            self._entries[name] = Entry(name, cls, cfg, self.n_args)
            cls.registered_name = name
            return cls
        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __getitem__(self, name: str) -> type:
        return self.get(name).cls

    def pop(self, name: str, default=None):
        entry = self._entries.pop(name, None)
        return entry.cls if entry else default

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise FisherError(f"unknown {self.family} {name!r}; registered {self.family}s: {', '.join(self.names())}")
        return self._entries[name]

    def config(self, name: str, **values):
        """The config dataclass of ``name`` filled with ``values``; each bad value is one FisherError line."""
        entry = self.get(name)
        known = {f.name: f for f in entry.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise FisherError(f"{self.family} {name!r}: invalid config {values} (unknown option(s) "
                              f"{', '.join(unknown)}; {name} has {', '.join(known) or 'no options'})")
        try:
            hints = typing.get_type_hints(entry.config)
        except Exception:       # a forward reference that does not resolve: fall back to the raw annotations
            hints = {}
        for key, value in values.items():
            if not _check_type(value, hints.get(key, known[key].type)):
                raise FisherError(f"{self.family} {name!r}: option {key}={value!r} has the wrong type "
                                  f"(expected {getattr(hints.get(key), '__name__', known[key].type)})")
        try:
            return entry.config(**values)
        except (TypeError, ValueError) as e:
            raise FisherError(f"{self.family} {name!r}: invalid config {values} ({e})") from e

    def build(self, name: str, *args, **values):
        """``cls(*args, **fields)`` with the fields of :meth:`config`."""
        entry = self.get(name)
        cfg = self.config(name, **values)
        try:
            obj = entry.cls(*args, **dataclasses.asdict(cfg))
        except (TypeError, ValueError) as e:
            raise FisherError(f"{self.family} {name!r}: invalid config {values} ({e})") from e
        if getattr(obj, "config", None) is None:
            obj.config = cfg
        return obj


PLUGINS_ENV = "FISHER_PLUGINS"
_loaded: set[str] = set()


def load_plugins() -> None:
    """Import the modules named in ``$FISHER_PLUGINS`` (comma separated): a family defined outside this
    package registers itself on import. Ray workers inherit the variable, so every process of a run
    knows the same families."""
    import importlib
    import os
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if name in _loaded:
            continue
        _loaded.add(name)
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise FisherError(f"${PLUGINS_ENV}: cannot import {name!r} ({e}); fix the module name or PYTHONPATH") from e
