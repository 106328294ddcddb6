"""The ``fisher`` command line: one sub-command per stage.

Each stage module exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a callable taking the parsed arguments.
"""
from __future__ import annotations

import argparse
import sys

from fisher.io import FisherError

STAGES = ("prepare", "train", "embed", "decode", "sweep", "evaluate", "pipeline")   # modules of raycluster, one per stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisher",
        description="Fisher-score embeddings for PixelCNN priors (Yan, Ho, Abbeel), scaled out on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    import importlib
    for name in STAGES:
        importlib.import_module(f"raycluster.{name}").register(sub)
    return parser


PATH_OPTIONS = ("src", "out", "data", "prior", "embeddings", "decoder", "cache", "fid_weights", "grid")


def _absolute(args) -> None:
    """Local paths → absolute: Ray workers do not share the driver's working directory."""
    import os
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" not in value and (os.sep in value or os.path.exists(value)):
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _absolute(args)
    try:
        args.func(args)
    except FisherError as e:
        print(f"fisher {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fisher {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
