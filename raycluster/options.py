"""Command-line options derived from config dataclasses: a field's flag, type, default and help
come from the field itself (``metadata={"flag": ..., "help": ...}``), so each value is defined and
checked in one place (its dataclass), and the stages never list an architecture's options by hand."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from fisher.errors import FisherError


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def _scalar_type(f: dataclasses.Field, hints: dict):
    t = hints.get(f.name, f.type)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    t = args[0] if args else t
    return t if t in (int, float, str) else str


def architecture_fields(registry) -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """{flag: [(architecture name, field), ...]} over every registered architecture's options
    (fields marked ``data`` come from the dataset and are not options)."""
    flags: dict[str, list] = {}
    for name in registry.names():
        for f in registry.get(name).fields():
            if not f.metadata.get("data"):
                flags.setdefault(_flag(f), []).append((name, f))
    return flags


def add_architecture_options(p: argparse.ArgumentParser, registry, title: str) -> None:
    """One option per field of every registered architecture; default None = the architecture's own."""
    g = p.add_argument_group(title)
    for flag, owners in architecture_fields(registry).items():
        hints = typing.get_type_hints(registry.get(owners[0][0]).config)
        f = owners[0][1]
        defaults = ", ".join(f"{n}: {o.default}" for n, o in owners)
        g.add_argument(flag, dest=f"arch_{flag[2:].replace('-', '_')}", default=None, type=_scalar_type(f, hints),
                       metavar=f.name.upper(), help=f"{f.metadata.get('help', f.name)} (default {defaults})")


def architecture_config(args, registry, name: str, option: str) -> dict:
    """The options given for architecture ``name`` as its config fields; an option of another
    architecture is refused with one line naming it."""
    registry.get(name)
    config, given = {}, []
    own = {_flag(f): f.name for f in registry.get(name).fields() if not f.metadata.get("data")}
    for flag in architecture_fields(registry):
        value = getattr(args, f"arch_{flag[2:].replace('-', '_')}", None)
        if value is None:
            continue
        if flag not in own:
            raise FisherError(f"{flag}: not an option of {registry.family} '{name}' (passed with {option} {name}); "
                              f"its options: {', '.join(own) or 'none'}")
        config[own[flag]] = value
        given.append(flag)
    return config
