"""``fisher run``: the whole pipeline from one command, with a report.

prepare → train-prior → sweep (Figure 3a grid: the Fisher embeddings of all
12 density × dimension cells from one gradient pass, one decoder per cell
with Ray Tune) → activation embeddings → decoders for Fisher scores and
activations → interpolation strips (and attribute edits on CelebA) →
interpolation FID (Algorithm 1) → ``report.md`` (written by
:func:`fisher.reports.run.write_report`).

Presets are JSON files (``raycluster/presets/``, or a path): ``mnist-small``
(default, a few minutes on a 2-core CPU), ``mnist-paper`` and
``celeba-paper`` (the paper's settings, for GPU clusters). Any value can be
overridden with ``--set section.key=value`` (e.g. ``--set prior.epochs=5``).
Without ``--address`` the run starts a local Ray; with ``--address auto``
(inside ``ray job submit``) it runs on the cluster. Every step is skipped when
its output already exists, so a rerun after a failure continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from fisher.io import FisherError, atomic_write_bytes, claim_output, exists, join, read_bytes
from raycluster.options import add_options, from_mapping, option
from raycluster.runtime import RayOptions

PRESETS = Path(__file__).with_name("presets")
DATA_ENV = "FISHER_DATA"


@dataclass(kw_only=True)
class RunOptions(RayOptions):
    """Options of ``fisher run``; each step's own options come from the preset's sections."""
    preset: str = option("mnist-small", help="preset name (" + ", ".join(sorted(f.stem for f in PRESETS.glob("*.json")))
                         + ") or a JSON file")
    data: str | None = option(os.environ.get(DATA_ENV),
                              help=f"raw dataset folder: the MNIST idx files, or the CelebA folder (default: "
                                   f"${DATA_ENV}; MNIST is downloaded when neither is given and the network is "
                                   "reachable)")
    out: str = option("runs/latest", help="run directory (default runs/latest)")
    fid_weights: str | None = option(os.environ.get("FISHER_FID_WEIGHTS"),
                                     help="FID Inception weights file (pytorch-fid's pt_inception-2015-12-05); "
                                          "default $FISHER_FID_WEIGHTS, else pytorch-fid downloads them")
    set: list = option(default_factory=list, append=True, metavar="SECTION.KEY=VALUE",
                       help="override a preset value (JSON values: --set prior.epochs=5 --set embed.gpu=true)")


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline on a preset and write a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, RunOptions)
    p.set_defaults(func=run, options=RunOptions)


def load_preset(name: str, overrides: list[str]) -> dict:
    path = Path(name) if name.endswith(".json") else PRESETS / f"{name}.json"
    if not path.exists():
        have = ", ".join(sorted(f.stem for f in PRESETS.glob("*.json")))
        raise FisherError(f"--preset {name}: no such preset (have {have}, or pass a .json file)")
    preset = _read_preset(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, field = key.partition(".")
        if not sep or not field or not isinstance(preset.get(section), dict):
            raise FisherError(f"--set {item}: expected SECTION.KEY=VALUE with SECTION one of "
                              f"{', '.join(k for k, v in preset.items() if isinstance(v, dict))}")
        try:
            preset[section][field] = json.loads(value)
        except json.JSONDecodeError:
            preset[section][field] = value
    preset["_name"], preset["_path"] = path.stem, str(path)
    return preset


REQUIRED_SECTIONS = ("prepare", "prior", "embed", "decoder", "interpolate", "evaluate")   # JSON objects
OPTIONAL_SECTIONS = ("sweep", "edit")                                                     # objects or null


def _read_preset(path: Path) -> dict:
    """A preset file parsed and checked: a JSON object with a known dataset and object-valued sections."""
    try:
        preset = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FisherError(f"{path}: not a JSON preset ({str(e)[:120]}); start from a copy of {PRESETS}/mnist-small.json") from e
    except OSError as e:
        raise FisherError(f"{path}: cannot be read ({e.strerror or e}); pass a readable preset file") from e
    if not isinstance(preset, dict):
        raise FisherError(f"{path}: a preset is a JSON object of sections, not a {type(preset).__name__}")
    if preset.get("dataset") not in ("mnist", "celeba"):
        raise FisherError(f"{path}: 'dataset' is {preset.get('dataset')!r}; expected \"mnist\" or \"celeba\"")
    for section in REQUIRED_SECTIONS + OPTIONAL_SECTIONS:
        value = preset.get(section, {} if section in REQUIRED_SECTIONS else None)
        if not isinstance(value, dict) and not (value is None and section in OPTIONAL_SECTIONS):
            raise FisherError(f"{path}: section '{section}' is {value!r:.40}, not a JSON object of options"
                              + ("" if section in REQUIRED_SECTIONS else " (or null to skip it)"))
    return preset


@dataclass
class Step:
    """One step of the run: a stage's ``run`` and its options object."""
    name: str
    command: str
    func: typing.Callable
    options: typing.Any
    done_file: str
    hint: str = ""


class _Runner:
    """Runs stages in-process with their options objects, skipping finished ones and timing the rest."""

    def __init__(self, out: str):
        self.out = out
        uri = join(out, "timings.json")
        self.timings = json.loads(read_bytes(uri)) if exists(uri) else {}

    def step(self, step: Step) -> None:
        if exists(join(self.out, step.done_file)):
            print(f"[run] {step.name}: done before, reused", flush=True)
            return
        print(f"[run] {step.name}: fisher {step.command} → {step.options.out}", flush=True)
        started = time.time()
        try:
            step.func(step.options)
        except FisherError as e:
            raise FisherError(f"step '{step.name}' (fisher {step.command}): {e}{step.hint}; fix it and rerun "
                              "`fisher run` to continue") from e
        self.timings[step.name] = round(time.time() - started, 1)
        atomic_write_bytes(join(self.out, "timings.json"), json.dumps(self.timings, indent=2).encode())


def plan(args: RunOptions, preset: dict) -> tuple[list[Step], dict]:
    """Every step's options object, built (and so checked, value by value) before the first step runs.
    Returns the steps and the embeddings the report reads ({kind: (directory, column)})."""
    from fisher.embedding import EmbedSpec
    from raycluster import embed, evaluate, prepare, sweep, train_decoder, train_prior
    out, dataset = args.out, preset["dataset"]
    d = lambda *p: join(out, *p)                                            # noqa: E731
    ray = {"address": args.address, "num_cpus": args.num_cpus}

    def where_of(section):
        def where(key):
            return next((f"--set {o}" for o in args.set if o.partition("=")[0] == f"{section}.{key}"),
                        preset["_path"])
        return where

    def opts(cls, section, command, mapping=None, **fixed):
        return from_mapping(cls, preset.get(section) if mapping is None else mapping, command, section,
                            where_of(section), **fixed)

    steps = [Step("prepare", "prepare", prepare.run,
                  opts(prepare.PrepareOptions, "prepare", "prepare", dataset=dataset, src=args.data, out=d("data")),
                  "data/manifest.json",
                  "" if args.data else f"; pass --data DIR (or set ${DATA_ENV}) with the raw {dataset} files"),
             Step("train-prior", "train-prior", train_prior.run,
                  opts(train_prior.TrainPriorOptions, "prior", "train-prior", data=d("data"), out=d("prior"), **ray),
                  "prior/manifest.json")]
    emb = dict(preset["embed"])
    projection = opts(embed.EmbedOptions, "embed", "embed", prior=d("prior"), data=d("data"), out=d("emb-fisher"),
                      **ray)
    if len(projection.dim) != 1 or len(projection.density) != 1:
        raise FisherError(f"{where_of('embed')('dim')}: embed.dim and embed.density must be one value each "
                          "(the grid's cells are the sweep's)")
    spec = EmbedSpec(projection.dim[0], projection.density[0])
    grid = None
    if preset.get("sweep"):
        import tune_spaces
        section = dict(preset["sweep"])
        if isinstance(section.get("grid"), str) and section["grid"].endswith(".json"):
            section["grid"] = os.path.abspath(section["grid"])
        grid = tune_spaces.load_grid(section["grid"], flag="sweep.grid")
        steps.append(Step("sweep", "sweep", sweep.run,
                          opts(sweep.SweepOptions, "sweep", "sweep", section, prior=d("prior"), data=d("data"),
                               out=d("sweep"), resume=True, seed=projection.seed, embed_actors=projection.actors,
                               **ray), "sweep/manifest.json"))
    transformed = bool(projection.pca or projection.standardize)
    in_grid = grid is not None and spec.dim in grid["dim"] and spec.density in grid["density"] and not projection.pca
    if in_grid:             # the Fisher embedding is one of the sweep's cells: reuse that gradient pass
        kinds = {"fisher": (d("sweep", "embeddings"), spec.column(single=len(grid["dim"]) * len(grid["density"]) == 1))}
    else:
        kinds = {"fisher": (d("emb-fisher"), "z_t" if transformed else "z")}
        steps.append(Step("embed-fisher", "embed", embed.run, projection, "emb-fisher/manifest.json"))
    kinds["activation"] = (d("emb-activation"), "z_t" if transformed else "z")
    steps.append(Step("embed-activation", "embed", embed.run,
                      dataclasses.replace(projection, kind="activation", out=d("emb-activation")),
                      "emb-activation/manifest.json"))
    for kind, (edir, col) in kinds.items():
        common = {"embeddings": edir, "data": d("data"), "column": col, **ray}
        decoder = opts(train_decoder.TrainDecoderOptions, "decoder", "train-decoder", out=d(f"decoder-{kind}"), **common)
        steps.append(Step(f"decoder-{kind}", "train-decoder", train_decoder.run, decoder, f"decoder-{kind}/manifest.json"))
        common["decoder"] = d(f"decoder-{kind}")
        steps.append(Step(f"interpolate-{kind}", "interpolate", evaluate.run_interpolate,
                          opts(evaluate.InterpolateOptions, "interpolate", "interpolate", out=d(f"interpolate-{kind}"),
                               **common), f"interpolate-{kind}/manifest.json"))
        if preset.get("edit"):
            edit = preset["edit"]
            steps.append(Step(f"edit-{kind}", "edit", evaluate.run_edit,
                              opts(evaluate.EditOptions, "edit", "edit",
                                   {k: v for k, v in edit.items() if k != "attributes"}, out=d(f"edit-{kind}"),
                                   attribute=",".join(edit.get("attributes") or []), **common),
                              f"edit-{kind}/manifest.json"))
        steps.append(Step(f"fid-{kind}", "evaluate", evaluate.run_evaluate,
                          opts(evaluate.EvaluateOptions, "evaluate", "evaluate", out=d(f"fid-{kind}"),
                               label=f"{kind}/{decoder.decoder}", fid_weights=args.fid_weights, **common),
                          f"fid-{kind}/fid.json"))
    return steps, kinds


def run(args: RunOptions) -> None:
    preset = load_preset(args.preset, args.set)
    if preset["dataset"] == "celeba" and not args.data:
        raise FisherError(f"celeba needs --data (or ${DATA_ENV}): the folder with img_align_celeba/, "
                          "list_attr_celeba.txt and list_eval_partition.txt")
    steps, kinds = plan(args, preset)            # every step's options checked before anything is written
    from raycluster.runtime import check_resources
    for step in steps:
        check_resources(step.options)
    claim_output(args.out, "run")
    r = _Runner(args.out)
    atomic_write_bytes(join(args.out, "preset.json"),
                       json.dumps({k: v for k, v in preset.items() if k != "_path"}, indent=2).encode())
    for step in steps:
        r.step(step)
    from fisher.reports.run import write_report
    report = write_report(args.out, preset, kinds, r.timings, paper_preset=_paper_preset(preset["dataset"]))
    print(f"report: {report}")


def _paper_preset(dataset: str) -> dict | None:
    """The paper-scale preset of ``dataset`` (``presets/<dataset>-paper.json``), for the report's comparison."""
    path = PRESETS / f"{dataset}-paper.json"
    return json.loads(path.read_text()) if path.exists() else None
