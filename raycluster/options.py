"""Stage options as typed dataclasses, and the command line derived from them.

Each stage declares one ``@dataclass(kw_only=True)`` of options whose fields are made with
:func:`option`: the field's name, type, default and help text give its command-line flag, and the
dataclass's ``__post_init__`` checks every value, once, where it is defined (one FisherError line
naming the flag). ``add_options(parser, Options)`` builds a sub-command's flags;
:func:`from_args` turns the parsed namespace into the options object, and :func:`from_mapping`
a preset section (``fisher run``); ``fisher run`` and ``fisher sweep`` call the other stages with
options objects, never argv strings. Architecture options (each registered prior's or decoder's
config fields) are derived from the registries (:func:`add_architecture_options`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import MISSING

from fisher.errors import FisherError


def option(default=MISSING, *, help: str, flag: str | None = None, parse=None, metavar: str | None = None,
           choices=None, positional: bool = False, default_factory=MISSING, architecture=None, append: bool = False):
    """A dataclass field that is also a command-line option.

    ``parse`` turns the command-line string into the value (and is applied to strings given in a
    preset); ``architecture`` (a registry) marks the dict of architecture options of that family.
    """
    meta = {"help": help, "flag": flag, "parse": parse, "metavar": metavar, "choices": choices,
            "positional": positional, "architecture": architecture, "append": append}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {}


def _base_type(t):
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args and typing.get_origin(t) is not list else t


def add_options(p: argparse.ArgumentParser, cls) -> None:
    """One flag (or positional argument) per field of options dataclass ``cls``."""
    hints = _hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "help" not in m:
            continue
        if m.get("architecture") is not None:
            add_architecture_options(p, m["architecture"], m["help"])
            continue
        target = p
        if getattr(cls, "_groups", None) and f.name in cls._groups:
            title = cls._groups[f.name]
            target = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        kwargs = {"help": m["help"]}
        if m.get("choices"):
            kwargs["choices"] = m["choices"]
        if m.get("metavar"):
            kwargs["metavar"] = m["metavar"]
        t = _base_type(hints.get(f.name, f.type))
        if m.get("positional"):
            target.add_argument(f.name, **kwargs)
            continue
        if m.get("append"):
            target.add_argument(flag_of(f), dest=f.name, action="append", default=[], **kwargs)
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        if t is bool and not required:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            target.add_argument(flag_of(f), dest=f.name, action=action, default=f.default, help=m["help"])
            continue
        if m.get("parse"):
            kwargs["type"] = _argparse_type(m["parse"])
        elif t in (int, float):
            kwargs["type"] = t
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not MISSING else f.default_factory()
        target.add_argument(flag_of(f), dest=f.name, **kwargs)


def _argparse_type(parse):
    def convert(text: str):
        try:
            return parse(text)
        except FisherError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def from_args(cls, args: argparse.Namespace):
    """The options object of a parsed command line."""
    values = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        reg = f.metadata.get("architecture")
        if reg is not None:
            values[f.name] = architecture_values(args, reg)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def from_mapping(cls, mapping: dict, command: str, section: str, where=None, **fixed):
    """The options object of a preset section (``fisher run``): keys are flag names with underscores
    (``batch_size``). An unknown key is refused with the closest option's name (``where(key)`` names
    the source: the preset file or the ``--set`` override); a string value of a parsed option is parsed."""
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    by_key = {flag_of(f)[2:].replace("-", "_"): f for f in fields if f.metadata.get("architecture") is None}
    arch_field = next((f for f in fields if f.metadata.get("architecture") is not None), None)
    arch_keys = {flag[2:].replace("-", "_"): flag
                 for flag in (architecture_fields(arch_field.metadata["architecture"]) if arch_field else {})}
    values, arch = dict(fixed), {}
    hints = _hints(cls)
    for key, value in (mapping or {}).items():
        if key in by_key:
            f = by_key[key]
            parse = f.metadata.get("parse")
            if not parse:               # a JSON value of another type or outside the choices: refused here, once
                _check_value(f, hints.get(f.name, f.type), value, where(key) if where else section, f"{section}.{key}")
            values[f.name] = parse(value) if parse and isinstance(value, str) else value
        elif key in arch_keys:
            arch[arch_keys[key]] = value
        else:
            close = difflib.get_close_matches(key, list(by_key) + list(arch_keys), n=1)
            raise FisherError(f"{where(key) if where else section}: `fisher {command}` has no option "
                              f"--{key.replace('_', '-')}" + (f"; did you mean {section}.{close[0]}?" if close else ""))
    if arch_field is not None:
        values[arch_field.name] = arch
    try:
        return cls(**values)
    except TypeError as e:       # a value of the wrong type where the dataclass compares or computes
        raise FisherError(f"{where(next(iter(mapping))) if where and mapping else section}: {e}") from e


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_value(f: dataclasses.Field, hint, value, where: str, key: str) -> None:
    """A preset or ``--set`` value against its option's type (int, float, bool, str, optional) and
    choices: one line naming the value, where it was given and what it must be."""
    from fisher.registry import _check_type
    choices = f.metadata.get("choices")
    if choices and value not in choices and not (value is None and f.default is None):
        raise FisherError(f"{where}: {key} is {value!r:.60}; expected one of {', '.join(map(str, choices))}")
    if not _check_type(value, hint):
        kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
        expected = " or ".join(_KIND_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
        if type(None) in typing.get_args(hint):
            expected += " (or null for the default)"
        raise FisherError(f"{where}: {key} is {value!r:.60}, not {expected}; fix the value in the preset or --set")


def architecture_fields(registry) -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """{flag: [(architecture name, field), ...]} over every registered architecture's options
    (fields marked ``data`` come from the dataset and are not options)."""
    flags: dict[str, list] = {}
    for name in registry.names():
        for f in registry.get(name).fields():
            if not f.metadata.get("data"):
                flags.setdefault(flag_of(f), []).append((name, f))
    return flags


def add_architecture_options(p: argparse.ArgumentParser, registry, title: str) -> None:
    """One option per field of every registered architecture; default None = the architecture's own."""
    g = p.add_argument_group(title)
    for flag, owners in architecture_fields(registry).items():
        f = owners[0][1]
        t = _base_type(_hints(registry.get(owners[0][0]).config).get(f.name, f.type))
        defaults = ", ".join(f"{n}: {_default(o)}" for n, o in owners)
        g.add_argument(flag, dest=f"arch_{flag[2:].replace('-', '_')}", default=None,
                       type=t if t in (int, float, str) else str,
                       metavar=f.name.upper(), help=f"{_owners_help(owners)} (default {defaults})")


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _owners_help(owners) -> str:
    helps = {o.metadata.get("help", o.name) for _, o in owners}
    if len(helps) == 1:
        return helps.pop()
    return "; ".join(f"{n}: {o.metadata.get('help', o.name)}" for n, o in owners)


def architecture_values(args, registry) -> dict:
    """{flag: value} of the architecture options given on the command line (any architecture's)."""
    out = {}
    for flag in architecture_fields(registry):
        value = getattr(args, f"arch_{flag[2:].replace('-', '_')}", None)
        if value is not None:
            out[flag] = value
    return out


def architecture_config(given: dict, registry, name: str, option: str) -> dict:
    """The architecture options ``given`` ({flag: value}, or already {field: value} from Python) as the
    config fields of architecture ``name``; an option of another architecture is refused with one line
    naming it."""
    registry.get(name)
    own = {flag_of(f): f.name for f in registry.get(name).fields() if not f.metadata.get("data")}
    config = {}
    for flag, value in given.items():
        if flag in own.values():
            config[flag] = value
            continue
        if flag not in own:
            raise FisherError(f"{flag}: not an option of {registry.family} '{name}' (passed with {option} {name}); "
                              f"its options: {', '.join(own) or 'none'}")
        config[own[flag]] = value
    return config


def at_least(opts, minimum, *names: str) -> None:
    """Refuse option values below ``minimum`` (None means 'not given' and passes): one line naming the flag."""
    for name in names:
        value = getattr(opts, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
            raise FisherError(f"--{name.replace('_', '-')} {value}: must be >= {minimum}")


def positive(opts, *names: str) -> None:
    """Refuse option values that are not finite numbers > 0."""
    import math
    for name in names:
        value = getattr(opts, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise FisherError(f"--{name.replace('_', '-')} {value}: must be a finite number > 0")


RAY_UNIT = 1e-4             # Ray counts CPUs and GPUs in steps of 0.0001: a smaller request fails in Ray


def ray_quantities(opts, *names: str) -> None:
    """Refuse resource requests (CPUs, GPUs per worker, actor or trial) that are not finite or that are
    above 0 but below Ray's unit, 0.0001 (Ray refuses them only when the first actor starts)."""
    import math
    for name in names:
        value = getattr(opts, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not math.isfinite(value) or 0 < value < RAY_UNIT):
            raise FisherError(f"--{name.replace('_', '-')} {value}: Ray counts resources in steps of 0.0001; "
                              "pass a finite value of at least 0.0001 (e.g. 0.5)")


SEED_MAX = 2**63 - 1        # torch.manual_seed and numpy take seeds up to this


def at_most(opts, maximum, *names: str, why: str = "") -> None:
    """Refuse option values above ``maximum`` (None passes): one line naming the flag (and ``why``)."""
    for name in names:
        value = getattr(opts, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > maximum:
            raise FisherError(f"--{name.replace('_', '-')} {value}: must be <= {maximum}" + (f" ({why})" if why else ""))


def seeds(opts, *names: str) -> None:
    """Seeds: integers in [0, 2^63 - 1]."""
    at_least(opts, 0, *names)
    at_most(opts, SEED_MAX, *names)
