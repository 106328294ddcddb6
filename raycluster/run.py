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

from fisher.io import FisherError, atomic_write_bytes, claim_output, exists, join, read_json
from raycluster import console
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

    def __init__(self, out: str, steps: int):
        self.out, self.steps, self.index, self.ran = out, steps, 0, 0
        uri = join(out, "timings.json")
        self.timings = read_json(uri, "timings record", "delete it and rerun `fisher run`") if exists(uri) else {}

    def step(self, step: Step) -> None:
        self.index += 1
        where = f"[run {self.index}/{self.steps}] {step.name}"
        if exists(join(self.out, step.done_file)):
            console.say(f"{where}: done before, reused")
            return
        console.say(f"{where}: fisher {step.command} → {step.options.out}")
        console.log(f"{where}: options {step.options}")
        started = time.time()
        try:
            step.func(step.options)
        except FisherError as e:
            raise FisherError(f"step '{step.name}' (fisher {step.command}): {e}{step.hint}; fix it and rerun "
                              "`fisher run` to continue") from e
        self.timings[step.name] = round(time.time() - started, 1)
        self.ran += 1
        atomic_write_bytes(join(self.out, "timings.json"), json.dumps(self.timings, indent=2).encode())
        console.say(f"{where}: finished in {_duration(self.timings[step.name])}")


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{seconds:.1f} s"


def environment(started: float) -> dict:
    """What the report states about where the run ran: library versions, this machine, the Ray cluster, and
    this invocation's wall time."""
    import platform

    import torch

    from fisher.io import library_versions
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    env = {"versions": library_versions(), "platform": platform.platform(),
           "driver": {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "gpus": gpus,
                      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
           "wall_seconds": round(time.time() - started, 1)}
    import sys
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            alive = [n for n in ray.nodes() if n["Alive"]]
            env["ray"] = {"nodes": len(alive), "CPU": sum(n["Resources"].get("CPU", 0) for n in alive),
                          "GPU": sum(n["Resources"].get("GPU", 0) for n in alive),
                          "address": ray.get_runtime_context().gcs_address}
    return env


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


KINDS = ("fisher", "activation", "pixel")     # embedding kinds a run compares (preset key "kinds")


@dataclass(kw_only=True)
class BaselineOptions:
    """The run's ``baselines`` step: the prior's NLL and the independent-pixel model's on the run's test split."""
    prior: str
    data: str
    out: str


def run_baselines(args: BaselineOptions) -> None:
    """Write ``baselines.json``: the prior's test NLL on this run's test split next to the independent-pixel
    model fitted on its train split (:func:`fisher.baselines.independent_pixel_nll`), in nats/image."""
    from fisher.baselines import independent_pixel_nll
    from fisher.data import data_levels, load_prepared
    from fisher.io import manifest_hash, read_manifest, write_manifest
    from fisher.priors import load_prior, prior_location, to_model_input
    from fisher.training import nll_metrics, nll_sum
    data = read_manifest(args.data, "prepare")
    train, test = load_prepared(args.data, "train"), load_prepared(args.data, "test")
    model, x = load_prior(args.prior), to_model_input(test["image"])
    total = sum(nll_sum(model, x[i:i + 256]) for i in range(0, len(x), 256))
    prior = {"source": args.prior, **nll_metrics(total, len(x), int(x[0].numel())), "n_test": len(x)}
    pixel = independent_pixel_nll(train["image"], test["image"], data_levels(data))
    result = {"split": "test", "prior": prior, "independent_pixel": pixel}
    atomic_write_bytes(join(args.out, "baselines.json"), json.dumps(result, indent=2).encode())
    write_manifest(args.out, "baselines", {"prior": args.prior},
                   inputs={"data": manifest_hash(data),
                           "prior": manifest_hash(read_manifest(prior_location(args.prior), "train-prior"))},
                   files=["baselines.json"])
    console.say(f"baselines: prior {prior['nll_nats']:.2f} nats/image, independent pixels {pixel['nll_nats_per_image']:.2f} "
          f"on {len(x)} test images")


def prior_of(args: RunOptions, preset: dict) -> str:
    """The prior a run uses: ``builtin:<prior.builtin>`` unless ``prior.train`` is true, else ``OUT/prior``."""
    section = preset.get("prior") or {}
    if section.get("builtin") is not None and not section.get("train", True):
        return f"builtin:{section['builtin']}"
    return join(args.out, "prior")


def seed_suffixes(preset: dict) -> list[str]:
    """Directory suffixes of the decoder/evaluation seeds (``evaluate.seeds``, default 1: no suffix)."""
    n = (preset.get("evaluate") or {}).get("seeds", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100:
        raise FisherError(f"evaluate.seeds {n!r}: must be an integer in 1..100 (decoders and pair draws per kind)")
    return [""] if n == 1 else [f"-s{k}" for k in range(n)]


def _base_seed(section: dict, name: str, where) -> int:
    """A section's ``seed``, to which the run adds the seed index: an integer (checked before the sum)."""
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FisherError(f"{where('seed')}: {name}.seed is {seed!r:.40}, not an integer; fix the value in the "
                          "preset or --set")
    return seed


def plan(args: RunOptions, preset: dict) -> tuple[list[Step], dict]:
    """Every step's options object, built (and so checked, value by value) before the first step runs.
    Returns the steps and the embeddings the report reads ({kind: (directory, column)})."""
    from fisher.embedding import EmbedSpec
    from raycluster import embed, evaluate, prepare, probe, sweep, train_decoder, train_prior
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
                  "" if args.data else f"; pass --data DIR (or set ${DATA_ENV}) with the raw {dataset} files")]
    prior_section = dict(preset.get("prior") or {})
    prior_section.pop("builtin", None)
    if not isinstance(prior_section.pop("train", True), bool):
        raise FisherError(f"{where_of('prior')('train')}: prior.train must be true or false")
    prior = prior_of(args, preset)
    # checked even when a builtin prior is used, so that a misspelt key is never ignored silently
    training = opts(train_prior.TrainPriorOptions, "prior", "train-prior", prior_section, data=d("data"),
                    out=d("prior"), **ray)
    if prior.startswith("builtin:"):
        from fisher.priors import prior_location
        prior_location(prior)                                   # an unknown name is refused now
    else:
        steps.append(Step("train-prior", "train-prior", train_prior.run, training, "prior/manifest.json"))
    steps.append(Step("baselines", "baselines", run_baselines, BaselineOptions(prior=prior, data=d("data"),
                                                                                  out=d("baselines")),
                      "baselines/manifest.json"))
    kinds_wanted = preset.get("kinds", list(KINDS))
    if not isinstance(kinds_wanted, list) or not kinds_wanted or any(k not in KINDS for k in kinds_wanted):
        raise FisherError(f"{preset['_path']}: kinds must be a non-empty list of {', '.join(KINDS)}")
    projection = opts(embed.EmbedOptions, "embed", "embed", prior=prior, data=d("data"), out=d("emb-fisher"), **ray)
    if len(projection.dim) != 1 or len(projection.density) != 1:
        raise FisherError(f"{where_of('embed')('dim')}: embed.dim and embed.density must be one value each "
                          "(the grid's cells are the sweep's)")
    spec = EmbedSpec(projection.dim[0], projection.density[0])
    grid = None
    if preset.get("sweep"):
        import tune_spaces
        section = {"grid": "paper_grid", **preset["sweep"]}      # SweepOptions' default grid
        if not isinstance(section["grid"], str):
            raise FisherError(f"{where_of('sweep')('grid')}: sweep.grid is {section['grid']!r:.40}, not a string; "
                              "pass a tune_spaces name (paper_grid) or a JSON file")
        if section["grid"].endswith(".json"):
            section["grid"] = os.path.abspath(section["grid"])
        grid = tune_spaces.load_grid(section["grid"], flag="sweep.grid")
        steps.append(Step("sweep", "sweep", sweep.run,
                          opts(sweep.SweepOptions, "sweep", "sweep", section, prior=prior, data=d("data"),
                               out=d("sweep"), resume=True, seed=projection.seed, embed_actors=projection.actors,
                               **ray), "sweep/manifest.json"))
    transformed = bool(projection.pca or projection.standardize)
    in_grid = grid is not None and spec.dim in grid["dim"] and spec.density in grid["density"] and not projection.pca
    kinds = {}
    for kind in kinds_wanted:
        if kind == "fisher" and in_grid:    # one of the sweep's cells: reuse that gradient pass
            kinds["fisher"] = (d("sweep", "embeddings"),
                               spec.column(single=len(grid["dim"]) * len(grid["density"]) == 1))
            continue
        options = dataclasses.replace(projection, kind=kind, out=d(f"emb-{kind}"))
        if kind == "pixel":                 # the images themselves: no prior, no standardization or PCA
            options = dataclasses.replace(options, prior=None, standardize=False, pca=None)
        kinds[kind] = (d(f"emb-{kind}"), "z_t" if transformed and kind != "pixel" else "z")
        steps.append(Step(f"embed-{kind}", "embed", embed.run, options, f"emb-{kind}/manifest.json"))
    evaluate_section = {k: v for k, v in (preset.get("evaluate") or {}).items() if k != "seeds"}
    decoder_section = dict(preset.get("decoder") or {})
    suffixes = seed_suffixes(preset)
    for kind, (edir, col) in kinds.items():
        common = {"embeddings": edir, "data": d("data"), "column": col, **ray}
        steps.append(Step(f"probe-{kind}", "probe", probe.run,
                          opts(probe.ProbeOptions, "probe", "probe", preset.get("probe") or {}, embeddings=edir,
                               data=d("data"), column=col, out=d(f"probe-{kind}")), f"probe-{kind}/manifest.json"))
        section = {"decoder": "pixels"} if kind == "pixel" else decoder_section
        for k, sfx in enumerate(suffixes if kind != "pixel" else [""]):
            seeded = {**section, "seed": _base_seed(section, "decoder", where_of("decoder")) + k}
            dec = opts(train_decoder.TrainDecoderOptions, "decoder", "train-decoder", seeded,
                       out=d(f"decoder-{kind}{sfx}"), **common)
            steps.append(Step(f"decoder-{kind}{sfx}", "train-decoder", train_decoder.run, dec,
                              f"decoder-{kind}{sfx}/manifest.json"))
        for k, sfx in enumerate(suffixes):
            dec_dir = d(f"decoder-{kind}{sfx if kind != 'pixel' else ''}")
            with_decoder = {**common, "decoder": dec_dir}
            if k == 0:
                steps.append(Step(f"interpolate-{kind}", "interpolate", evaluate.run_interpolate,
                                  opts(evaluate.InterpolateOptions, "interpolate", "interpolate",
                                       out=d(f"interpolate-{kind}"), **with_decoder),
                                  f"interpolate-{kind}/manifest.json"))
                if preset.get("edit") and kind != "pixel":
                    edit = preset["edit"]
                    names = edit.get("attributes") or []
                    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                        raise FisherError(f"{where_of('edit')('attributes')}: edit.attributes is {names!r:.40}, not "
                                          'a list of attribute names; pass e.g. ["Smiling", "Eyeglasses"]')
                    steps.append(Step(f"edit-{kind}", "edit", evaluate.run_edit,
                                      opts(evaluate.EditOptions, "edit", "edit",
                                           {k: v for k, v in edit.items() if k != "attributes"},
                                           out=d(f"edit-{kind}"), attribute=",".join(edit.get("attributes") or []),
                                           **with_decoder), f"edit-{kind}/manifest.json"))
            seeded = {**evaluate_section, "seed": _base_seed(evaluate_section, "evaluate", where_of("evaluate")) + k}
            steps.append(Step(f"fid-{kind}{sfx}", "evaluate", evaluate.run_evaluate,
                              opts(evaluate.EvaluateOptions, "evaluate", "evaluate", seeded, out=d(f"fid-{kind}{sfx}"),
                                   label=f"{kind}/{section.get('decoder', 'conv')}",
                                   fid_weights=args.fid_weights, **with_decoder),
                              f"fid-{kind}{sfx}/fid.json"))
    return steps, kinds


def run(args: RunOptions) -> None:
    preset = load_preset(args.preset, args.set)
    if preset["dataset"] == "celeba" and not args.data:
        raise FisherError(f"celeba needs --data (or ${DATA_ENV}): the folder with img_align_celeba/, "
                          "list_attr_celeba.txt and list_eval_partition.txt")
    _check_raw(args.data, preset["dataset"])
    steps, kinds = plan(args, preset)            # every step's options checked before anything is written
    from raycluster.runtime import check_resources
    for step in steps:
        check_resources(step.options)
    claim_output(args.out, "run")
    started = time.time()
    r = _Runner(args.out, len(steps))
    atomic_write_bytes(join(args.out, "preset.json"),
                       json.dumps({k: v for k, v in preset.items() if k != "_path"}, indent=2).encode())
    for step in steps:
        r.step(step)
    from fisher.reports.run import write_report
    env_uri = join(args.out, "environment.json")      # of the last invocation that ran a step: a rerun that
    if r.ran or not exists(env_uri):                  # reuses every step rewrites the same report
        env = environment(started)
        atomic_write_bytes(env_uri, json.dumps(env, indent=2).encode())
    else:
        env = read_json(env_uri, "run environment record", "delete it and rerun `fisher run`")
    report = write_report(args.out, preset, kinds, r.timings, paper_preset=_paper_preset(preset["dataset"]),
                          prior=prior_of(args, preset), suffixes=seed_suffixes(preset), environment=env)
    console.say(f"report: {report} ({len(steps)} steps, {r.ran} run now in {_duration(time.time() - started)}; "
                f"log: {console.log_path() or 'none'})")


def _check_raw(data: str | None, dataset: str) -> None:
    """``--data`` must hold the raw files of the preset's dataset: refused before the run claims its --out
    (the prepare step would fail with nothing done but the claim)."""
    from fisher.data import CELEBA_ATTRS, CELEBA_IMAGES, CELEBA_PARTITION, MNIST_NAMES
    from fisher.io import is_dir
    if not data:
        return
    if not is_dir(data):
        raise FisherError(f"--data {data}: not a directory; pass --data DIR (or set ${DATA_ENV}) with the raw "
                          f"{dataset} files")
    names = MNIST_NAMES if dataset == "mnist" else (CELEBA_ATTRS, CELEBA_PARTITION, CELEBA_IMAGES)
    missing = [n for n in names if not exists(join(data, n))]
    if missing:
        raise FisherError(f"--data {data}: no {', '.join(missing)}; pass --data DIR (or set ${DATA_ENV}) with the "
                          f"raw {dataset} files")


def _paper_preset(dataset: str) -> dict | None:
    """The paper-scale preset of ``dataset`` (``presets/<dataset>-paper.json``), for the report's comparison."""
    path = PRESETS / f"{dataset}-paper.json"
    return json.loads(path.read_text()) if path.exists() else None
