"""``fisher run``: the whole pipeline from one command, with a report.

prepare → train-prior → sweep (Figure 3a grid: the Fisher embeddings of all
12 density × dimension cells from one gradient pass, one decoder per cell
with Ray Tune) → activation embeddings → decoders for Fisher scores and
activations → interpolation strips (and attribute edits on CelebA) →
interpolation FID (Algorithm 1) → ``report.md`` (written by
:func:`fisher.reports.run.write_run_reports`).

Presets are JSON files (``raycluster/presets/``, or a path): ``mnist-small``
(default, a few minutes on a 2-core CPU), ``mnist-medium``, ``celeba-small``,
``mnist-paper`` and ``celeba-paper`` (the paper's settings, for GPU clusters).
Any value can be overridden with ``--set section.key=value`` (e.g. ``--set
prior.epochs=5``, or ``--set priors.gated.epochs=5`` in a preset whose
``priors`` compare several priors, each under ``OUT/<label>/``).
Without ``--address`` the run starts a local Ray; with ``--address auto``
(inside ``ray job submit``) it runs on the cluster. Every step is skipped when
its output already exists, so a rerun after a failure continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from fisher.io import FisherError, atomic_write_bytes, claim_output, exists, join, read_json
from fisher.reports.run import decoder_sections, latent_location, row_name
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
        *sections, field = key.split(".")
        target = preset
        for part in sections:
            target = target.get(part) if isinstance(target, dict) else None
        if not sep or not sections or not field or not isinstance(target, dict):
            raise FisherError(f"--set {item}: expected SECTION.KEY=VALUE with SECTION one of "
                              f"{', '.join(_sections(preset))}")
        try:
            target[field] = json.loads(value)
        except json.JSONDecodeError:
            target[field] = value
    _check_latents(preset, next((f"--set {o}" for o in overrides if o.startswith("latents.")), str(path)))
    preset["_name"], preset["_path"] = path.stem, str(path)
    return preset


REQUIRED_SECTIONS = ("prepare", "prior", "embed", "decoder", "interpolate", "evaluate")   # JSON objects
OPTIONAL_SECTIONS = ("sweep", "edit")                                                     # objects or null
PRIOR_LABEL = re.compile(r"[a-z][a-z0-9_]{0,31}")
RESERVED_LABELS = ("data", "logs")             # top-level directories of a run


def _sections(preset: dict) -> list[str]:
    """The names ``--set SECTION.KEY=VALUE`` accepts: top-level objects, ``priors.<label>``,
    ``decoders.<label>`` and ``latents.<kind>``."""
    labelled = ("priors", "decoders", "latents")
    names = [k for k, v in preset.items() if isinstance(v, dict) and k not in labelled]
    return names + [f"{s}.{k}" for s in labelled for k in (preset.get(s) or {})]


def prior_sections(preset: dict) -> dict[str, dict]:
    """{label: prior section}: ``{"": prior}`` for a one-prior preset; the ``priors`` object of a preset that
    compares several (each label is the directory that prior's steps write under the run)."""
    return dict(preset["priors"]) if preset.get("priors") else {"": preset.get("prior") or {}}


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
    priors = _labelled(path, preset, "priors", "prior", '{"pixelcnn": {"builtin": "celeba32-pixelcnn", "train": false}}')
    decoders = _labelled(path, preset, "decoders", "decoder", '{"conv": {"decoder": "conv"}, "realnvp": {"decoder": '
                                                              '"realnvp"}}')
    _check_latents(preset, str(path))
    for section in REQUIRED_SECTIONS + OPTIONAL_SECTIONS:
        if (section == "prior" and priors is not None) or (section == "decoder" and decoders is not None):
            continue
        value = preset.get(section, {} if section in REQUIRED_SECTIONS else None)
        if not isinstance(value, dict) and not (value is None and section in OPTIONAL_SECTIONS):
            raise FisherError(f"{path}: section '{section}' is {value!r:.40}, not a JSON object of options"
                              + ("" if section in REQUIRED_SECTIONS else " (or null to skip it)"))
    return preset


def _check_latents(preset: dict, where: str) -> None:
    """The ``latents`` object: {embedding kind: a latent model's section}, for known kinds only."""
    latents = preset.get("latents")
    if latents is not None and (not isinstance(latents, dict) or not all(isinstance(v, dict) for v in latents.values())
                                or set(latents) - set(LATENT_KINDS)):
        raise FisherError(f"{where}: 'latents' is {latents!r:.60}; expected an object of latent-model sections named by "
                          f"their embedding kind ({', '.join(LATENT_KINDS)}), e.g. "
                          '{"pixelvae": {"builtin": "mnist-pixelvae", "train": false}}')


def _labelled(path: Path, preset: dict, several: str, one: str, example: str) -> dict | None:
    """A preset's ``priors`` / ``decoders`` object ({label: section}, comparing several), checked: exclusive
    with the one-section key, non-empty, object-valued, labels usable as directory names."""
    sections = preset.get(several)
    if sections is None:
        return None
    if one in preset:
        raise FisherError(f"{path}: has both '{one}' and '{several}'; keep one ('{several}' compares several, "
                          "one section per label)")
    if not isinstance(sections, dict) or not sections or not all(isinstance(v, dict) for v in sections.values()):
        raise FisherError(f"{path}: '{several}' is {sections!r:.40}; expected an object of {one} sections, e.g. "
                          + example)
    for label in sections:
        if not PRIOR_LABEL.fullmatch(label) or label in RESERVED_LABELS:
            raise FisherError(f"{path}: {one} label {label!r:.40} must be a lower-case name (a-z, 0-9, _; "
                              f"not {' or '.join(RESERVED_LABELS)}): it names the {one}'s directories in the run")
    return sections


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
LATENT_KINDS = ("pixelvae", "realnvp")        # the seed papers' latents (preset key "latents", one model each)
OWN_DECODER = {"pixel": "pixels", "pixelvae": "latent", "realnvp": "latent"}   # kinds decoded by a fixed decoder


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


def prior_of(out: str, section: dict, label: str = "") -> str:
    """The prior of one prior section: ``builtin:<builtin>`` unless ``train`` is true, else
    ``OUT[/label]/prior``."""
    if section.get("builtin") is not None and not section.get("train", True):
        return f"builtin:{section['builtin']}"
    return join(out, label, "prior")


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

    Returns the steps and, per prior label ("" for a one-prior preset), the embeddings the report reads
    ({label: {row: (directory, column)}}, a row being an embedding kind, or ``<kind>-<decoder label>`` in
    a preset with several ``decoders``). With several priors (preset key ``priors``) each prior's
    steps write under ``OUT/<label>/``; the data and the pixel baseline, which no prior changes, are
    made once, at the top of the run (label "" in the result)."""
    from raycluster import prepare
    out, dataset = args.out, preset["dataset"]
    planner = _Planner(args, preset)
    steps = [Step("prepare", "prepare", prepare.run,
                  planner.opts(prepare.PrepareOptions, "prepare", "prepare", dataset=dataset, src=args.data,
                               out=join(out, "data")),
                  "data/manifest.json",
                  "" if args.data else f"; pass --data DIR (or set ${DATA_ENV}) with the raw {dataset} files")]
    kinds_wanted = preset.get("kinds", list(KINDS))
    if not isinstance(kinds_wanted, list) or not kinds_wanted or any(k not in KINDS for k in kinds_wanted):
        raise FisherError(f"{preset['_path']}: kinds must be a non-empty list of {', '.join(KINDS)}")
    sections = prior_sections(preset)
    several = "" not in sections
    runs = {}
    for label, section in sections.items():
        kinds = [k for k in kinds_wanted if not (several and k == "pixel")]
        runs[label] = planner.prior_steps(steps, label, section, kinds)
    if several and "pixel" in kinds_wanted:
        runs[""] = planner.kind_steps(steps, "", None, ["pixel"])
    for kind, section in (preset.get("latents") or {}).items():     # made once: no prior changes them
        runs.setdefault("", {}).update(planner.latent_steps(steps, kind, section))
    return steps, runs


class _Planner:
    """Builds the steps of one run: options objects from the preset's sections, paths under ``--out``."""

    def __init__(self, args: RunOptions, preset: dict):
        self.args, self.preset = args, preset
        self.ray = {"address": args.address, "num_cpus": args.num_cpus}

    def where_of(self, section):
        def where(key):
            return next((f"--set {o}" for o in self.args.set if o.partition("=")[0] == f"{section}.{key}"),
                        self.preset["_path"])
        return where

    def opts(self, cls, section, command, mapping=None, **fixed):
        return from_mapping(cls, self.preset.get(section) if mapping is None else mapping, command, section,
                            self.where_of(section), **fixed)

    def d(self, label, *parts):
        return join(self.args.out, label, *parts)

    def _rel(self, label, name):
        return f"{label}/{name}" if label else name

    def prior_steps(self, steps: list, label: str, section: dict, kinds: list[str]) -> dict:
        """The steps of one prior (train-prior unless builtin, baselines, sweep, embeddings and everything
        after them); returns {row: (embedding dir, column)} (:func:`row_name`)."""
        from fisher.embedding import EmbedSpec
        from raycluster import embed, sweep, train_prior
        name = f"priors.{label}" if label else "prior"
        where, tag = self.where_of(name), (f"{label}/" if label else "")
        section = dict(section)
        section.pop("builtin", None)
        if not isinstance(section.pop("train", True), bool):
            raise FisherError(f"{where('train')}: {name}.train must be true or false")
        data = join(self.args.out, "data")
        prior = prior_of(self.args.out, prior_sections(self.preset)[label], label)
        # checked even when a builtin prior is used, so that a misspelt key is never ignored silently
        training = self.opts(train_prior.TrainPriorOptions, name, "train-prior", section, data=data,
                             out=self.d(label, "prior"), **self.ray)
        if prior.startswith("builtin:"):
            from fisher.priors import prior_location
            prior_location(prior)                                   # an unknown name is refused now
        else:
            steps.append(Step(f"{tag}train-prior", "train-prior", train_prior.run, training,
                              self._rel(label, "prior/manifest.json")))
        steps.append(Step(f"{tag}baselines", "baselines", run_baselines,
                          BaselineOptions(prior=prior, data=data, out=self.d(label, "baselines")),
                          self._rel(label, "baselines/manifest.json")))
        projection = self.opts(embed.EmbedOptions, "embed", "embed", prior=prior, data=data,
                               out=self.d(label, "emb-fisher"), **self.ray)
        if len(projection.dim) != 1 or len(projection.density) != 1:
            raise FisherError(f"{self.where_of('embed')('dim')}: embed.dim and embed.density must be one value each "
                              "(the grid's cells are the sweep's)")
        spec = EmbedSpec(projection.dim[0], projection.density[0])
        grid = None
        if self.preset.get("sweep"):
            import tune_spaces
            sweep_section = {"grid": "paper_grid", **self.preset["sweep"]}      # SweepOptions' default grid
            if not isinstance(sweep_section["grid"], str):
                raise FisherError(f"{self.where_of('sweep')('grid')}: sweep.grid is {sweep_section['grid']!r:.40}, "
                                  "not a string; pass a tune_spaces name (paper_grid) or a JSON file")
            if sweep_section["grid"].endswith(".json"):
                sweep_section["grid"] = os.path.abspath(sweep_section["grid"])
            grid = tune_spaces.load_grid(sweep_section["grid"], flag="sweep.grid")
            steps.append(Step(f"{tag}sweep", "sweep", sweep.run,
                              self.opts(sweep.SweepOptions, "sweep", "sweep", sweep_section, prior=prior, data=data,
                                        out=self.d(label, "sweep"), resume=True, seed=projection.seed,
                                        embed_actors=projection.actors, **self.ray),
                              self._rel(label, "sweep/manifest.json")))
        in_grid = grid is not None and spec.dim in grid["dim"] and spec.density in grid["density"] \
            and not projection.pca
        reuse = {}
        if "fisher" in kinds and in_grid:    # one of the sweep's cells: reuse that gradient pass
            reuse["fisher"] = (self.d(label, "sweep", "embeddings"),
                               spec.column(single=len(grid["dim"]) * len(grid["density"]) == 1))
        return self.kind_steps(steps, label, projection, kinds, reuse)

    def latent_steps(self, steps: list, kind: str, section: dict) -> dict:
        """The seed papers' baseline ``kind`` (pixelvae, realnvp): its model (``train-prior --prior <kind>``
        under ``OUT/<kind>-model/`` unless a builtin is used), then the steps of any kind; returns its row."""
        from raycluster import embed, train_prior
        name, where = f"latents.{kind}", self.where_of(f"latents.{kind}")
        section = dict(section)
        location = latent_location(self.args.out, kind, section)
        section.pop("builtin", None)
        if not isinstance(section.pop("train", True), bool):
            raise FisherError(f"{where('train')}: {name}.train must be true or false")
        if section.setdefault("prior", kind) != kind:
            raise FisherError(f"{where('prior')}: {name}.prior is {section['prior']!r:.40}; the {kind} row's model "
                              f"is a --prior {kind}")
        data = join(self.args.out, "data")
        training = self.opts(train_prior.TrainPriorOptions, name, "train-prior", section, data=data,
                             out=join(self.args.out, f"{kind}-model"), **self.ray)
        if location.startswith("builtin:"):
            from fisher.priors import prior_location
            prior_location(location)
        else:
            steps.append(Step(f"train-{kind}", "train-prior", train_prior.run, training, f"{kind}-model/manifest.json"))
        options = self.opts(embed.EmbedOptions, "embed", "embed", prior=location, data=data, kind=kind,
                            out=self.d("", f"emb-{kind}"), standardize=False, pca=None, **self.ray)
        return self.kind_steps(steps, "", options, [kind])

    def kind_steps(self, steps: list, label: str, projection, kinds: list[str], reuse: dict | None = None) -> dict:
        """Embeddings (unless ``reuse`` holds them) and probes per kind; decoders, strips, edits and FID per
        kind and decoder section (:meth:`decoder_steps`); returns {row: (embedding dir, column)}."""
        from raycluster import embed, probe
        d, tag, preset, data = (lambda *p: self.d(label, *p)), (f"{label}/" if label else ""), self.preset, \
            join(self.args.out, "data")
        if projection is None:                 # the pixel baseline of a several-prior run: no prior at all
            projection = self.opts(embed.EmbedOptions, "embed", "embed", prior=None, data=data, kind="pixel",
                                   out=d("emb-pixel"), **self.ray)
        transformed = bool(projection.pca or projection.standardize)
        kinds_out = dict(reuse or {})
        for kind in kinds:
            if kind in kinds_out:
                continue
            options = dataclasses.replace(projection, kind=kind, out=d(f"emb-{kind}"))
            if kind == "pixel":                 # the images themselves: no prior, no standardization or PCA
                options = dataclasses.replace(options, prior=None, standardize=False, pca=None)
            kinds_out[kind] = (d(f"emb-{kind}"), "z_t" if transformed and kind not in OWN_DECODER else "z")
            steps.append(Step(f"{tag}embed-{kind}", "embed", embed.run, options, self._rel(label, f"emb-{kind}/manifest.json")))
        kinds_out = {k: kinds_out[k] for k in kinds}
        evaluate_section = {k: v for k, v in (preset.get("evaluate") or {}).items() if k != "seeds"}
        suffixes = seed_suffixes(preset)
        rows = {}
        for kind, (edir, col) in kinds_out.items():
            common = {"embeddings": edir, "data": data, "column": col, **self.ray}
            steps.append(Step(f"{tag}probe-{kind}", "probe", probe.run,
                              self.opts(probe.ProbeOptions, "probe", "probe", preset.get("probe") or {},
                                        embeddings=edir, data=data, column=col, out=d(f"probe-{kind}")),
                              self._rel(label, f"probe-{kind}/manifest.json")))
            decoders = {"": {"decoder": OWN_DECODER[kind]}} if kind in OWN_DECODER else decoder_sections(preset)
            for dlabel, section in decoders.items():
                row = row_name(kind, dlabel)
                rows[row] = (edir, col)
                self.decoder_steps(steps, label, row, kind, dlabel, section, common, evaluate_section, suffixes)
        return rows

    def decoder_steps(self, steps: list, label: str, row: str, kind: str, dlabel: str, section: dict, common: dict,
                      evaluate_section: dict, suffixes: list[str]) -> None:
        """One report row: the decoders (one per seed) of one embedding kind, its strips, edits and FID."""
        from raycluster import evaluate, train_decoder
        d, tag, preset = (lambda *p: self.d(label, *p)), (f"{label}/" if label else ""), self.preset
        name = f"decoders.{dlabel}" if dlabel else "decoder"
        where = self.where_of(name)
        own = kind in OWN_DECODER            # a fixed decoder: one, whatever the seeds
        for k, sfx in enumerate(suffixes if not own else [""]):
            seeded = {**section, "seed": _base_seed(section, name, where) + k}
            dec = self.opts(train_decoder.TrainDecoderOptions, name, "train-decoder", seeded,
                            out=d(f"decoder-{row}{sfx}"), **common)
            steps.append(Step(f"{tag}decoder-{row}{sfx}", "train-decoder", train_decoder.run, dec,
                              self._rel(label, f"decoder-{row}{sfx}/manifest.json")))
        for k, sfx in enumerate(suffixes):
            with_decoder = {**common, "decoder": d(f"decoder-{row}{sfx if not own else ''}")}
            if k == 0:
                steps.append(Step(f"{tag}interpolate-{row}", "interpolate", evaluate.run_interpolate,
                                  self.opts(evaluate.InterpolateOptions, "interpolate", "interpolate",
                                            out=d(f"interpolate-{row}"), **with_decoder),
                                  self._rel(label, f"interpolate-{row}/manifest.json")))
                if preset.get("edit") and kind != "pixel":
                    edit = preset["edit"]
                    names = edit.get("attributes") or []
                    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                        raise FisherError(f"{self.where_of('edit')('attributes')}: edit.attributes is "
                                          f"{names!r:.40}, not a list of attribute names; pass e.g. "
                                          '["Smiling", "Eyeglasses"]')
                    steps.append(Step(f"{tag}edit-{row}", "edit", evaluate.run_edit,
                                      self.opts(evaluate.EditOptions, "edit", "edit",
                                                {k: v for k, v in edit.items() if k != "attributes"},
                                                out=d(f"edit-{row}"), attribute=",".join(names),
                                                **with_decoder), self._rel(label, f"edit-{row}/manifest.json")))
            seeded = {**evaluate_section, "seed": _base_seed(evaluate_section, "evaluate", self.where_of("evaluate")) + k}
            steps.append(Step(f"{tag}fid-{row}{sfx}", "evaluate", evaluate.run_evaluate,
                              self.opts(evaluate.EvaluateOptions, "evaluate", "evaluate", seeded,
                                        out=d(f"fid-{row}{sfx}"), label=f"{kind}/{dlabel or section.get('decoder', 'conv')}",
                                        fid_weights=self.args.fid_weights, **with_decoder),
                              self._rel(label, f"fid-{row}{sfx}/fid.json")))


def run(args: RunOptions) -> None:
    preset = load_preset(args.preset, args.set)
    if preset["dataset"] == "celeba" and not args.data:
        raise FisherError(f"celeba needs --data (or ${DATA_ENV}): the folder with img_align_celeba/, "
                          "list_attr_celeba.txt and list_eval_partition.txt")
    _check_raw(args.data, preset["dataset"])
    steps, runs = plan(args, preset)             # every step's options checked before anything is written
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
    from fisher.reports.run import write_run_reports
    env_uri = join(args.out, "environment.json")      # of the last invocation that ran a step: a rerun that
    if r.ran or not exists(env_uri):                  # reuses every step rewrites the same report
        env = environment(started)
        atomic_write_bytes(env_uri, json.dumps(env, indent=2).encode())
    else:
        env = read_json(env_uri, "run environment record", "delete it and rerun `fisher run`")
    priors = {label: prior_of(args.out, section, label) for label, section in prior_sections(preset).items()}
    report = write_run_reports(args.out, preset, runs, priors, r.timings, _paper_preset(preset["dataset"]),
                               seed_suffixes(preset), env)
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
