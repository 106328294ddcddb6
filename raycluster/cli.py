"""The ``fisher`` command line: one sub-command per stage.

Each stage module exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a callable taking the parsed arguments.
"""
from __future__ import annotations

import argparse
import sys

from fisher.io import FisherError, check_output, claim_output, output_state, release_claim
from raycluster import console

STAGES = ("prepare", "train_prior", "embed", "train_decoder", "sweep", "evaluate", "probe", "run", "priors")   # modules of raycluster, one per stage


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (a newline in a file name or option value printed as
    ``\\n``), so that an error naming it stays one line."""
    import re
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group(0))[1:-1], text)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``fisher <command>: error: ...``, like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fisher",
        description="Fisher-score embeddings for autoregressive priors (Yan, Ho, Abbeel), scaled out on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    import importlib
    for name in STAGES:
        importlib.import_module(f"raycluster.{name}").register(sub)
    for command, p in sub.choices.items():
        if any(a.dest == "out" for a in p._actions):
            p.add_argument("--verbose", action="store_true",
                           help="show Ray's own output live as well (it always goes to OUT/logs/)")
    return parser


PATH_OPTIONS = ("src", "out", "data", "prior", "embeddings", "decoder", "cache", "fid_weights", "grid")


def _absolute(args) -> None:
    """Local paths → absolute: Ray workers do not share the driver's working directory. A bare name is
    kept where it may mean something else (``--grid paper_grid``, ``--prior builtin:...``), but not for
    ``--out``, which is always a path (``--out run1`` is ``$PWD/run1``)."""
    import os
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" not in value and (os.sep in value or os.path.exists(value)
                                                              or (name == "out" and value.strip())):
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))


def _unrecognized(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    import difflib
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(extra[0].split("=", 1)[0], flags, n=1) if extra[0].startswith("--") else []
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close else ""))


INPUT_OPTIONS = ("data", "prior", "embeddings", "decoder")     # artifacts a stage reads (--src, raw files, is not one)


def _out_apart(args, command: str) -> None:
    """Refuse an ``--out`` that is an input artifact or lies inside one: the stage would write into another
    stage's artifact, which later stages and reruns read as it was (a raw ``--src`` folder may hold --out)."""
    import os
    out = getattr(args, "out", None)
    if not isinstance(out, str) or not out.strip():
        return
    norm = lambda p: p.rstrip("/") if "://" in p else os.path.realpath(p)     # noqa: E731
    target = norm(out)
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None) if (command, name) != ("run", "data") else None   # run: raw --data
        if not isinstance(value, str) or not ("://" in value or os.sep in value) or norm(value) in ("", "/"):
            continue
        source = norm(value)
        if target == source or target.startswith(source.rstrip("/") + "/"):
            raise FisherError(f"--out {out}: {'is' if target == source else 'inside'} the input --{name} {value}; "
                              "pass an --out outside every input directory")


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run one command; its exit status (0, 2 for an error, 1 for an unexpected failure, 130 interrupted).
    With an ``--out``, everything but the command's own lines goes to ``OUT/logs/`` (:mod:`raycluster.console`).
    ``own_process``: the ``fisher`` executable, whose Ray is shut down (its last lines logged) before it exits."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:                       # named by the command's own parser, with the closest option
            _unrecognized(parser, args.command, extra)
    except SystemExit as e:             # --help (0) or a usage error, already printed as one line (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    command, func, verbose = args.command, args.func, getattr(args, "verbose", False)
    out = None                          # --out once checked: a claim that no work followed is undone on failure
    status = 0
    try:
        for name, value in vars(args).items():      # a file name that is not UTF-8 (undecodable bytes)
            if isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value):
                raise FisherError(f"--{name.replace('_', '-')} {ascii(value)}: not a UTF-8 name; rename the file "
                                  "or directory (or pass a path that names it in UTF-8)")
        for name in ("src", "data", "embeddings", "decoder"):    # "" would name the current directory's root
            value = getattr(args, name, None)
            if isinstance(value, str) and not value.strip() and (command, name) != ("run", "data"):   # run: download
                raise FisherError(f"--{name} {value!r}: an empty path; pass the directory itself")
        _absolute(args)
        options = getattr(args, "options", None)
        if options is not None:         # the stage's typed options: every value checked by its dataclass
            from raycluster.options import from_args
            args = from_args(options, args)
        _out_apart(args, command)
        if isinstance(getattr(args, "out", None), str):
            check_output(args.out)      # a missing bucket is refused before any work or write
            claim_output(args.out, command, write=False)     # "", /, a file, foreign files: refused now
            out, before = args.out, output_state(args.out)
        if hasattr(args, "address"):    # requests Ray could never meet, an --address nothing answers at
            from raycluster.runtime import check_address, check_resources
            check_resources(args)
            if args.address:
                check_address(args.address)
        if out is not None:
            console.start(out, command, verbose)
        func(args)
    except FisherError as e:
        console.error(f"fisher {command}: error: {one_line(str(e))}")
        status = 2
    except OSError as e:                # a path the stage did not expect to be unreadable, or a lost connection
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ("check --address and that the Ray cluster is reachable" if isinstance(e, ConnectionError) else
                "check that the path exists and that this user may read (and for --out, write) it")
        console.error(f"fisher {command}: error: {one_line(reason)}; {hint}")
        status = 2
    except KeyboardInterrupt:
        console.error(f"fisher {command}: interrupted; rerun the same command to continue")
        status = 130
    except Exception as e:              # a bug: one line here, the traceback in the log
        import traceback
        where = console.log_path()
        if where is None:
            raise
        console.log(traceback.format_exc())
        console.error(f"fisher {command}: unexpected failure: {type(e).__name__}: {one_line(str(e))[:300]} "
                      f"(traceback in {where})")
        status = 1
    finally:
        refused = status == 2 and not console.began()       # bad input: no log is left behind either
        if own_process:
            _shutdown_ray()
        console.close()
    released = status == 2 and out is not None and release_claim(out, before)
    console.finish(keep=not (released or refused))
    return status


def _shutdown_ray() -> None:
    """Stop the Ray this process started or joined while its last output still goes to the log."""
    import sys
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()


def entry() -> None:
    """The ``fisher`` executable."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    entry()
