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
import json
import os
import time
from pathlib import Path

from fisher.io import FisherError, atomic_write_bytes, exists, join, read_bytes
from raycluster.runtime import add_ray_args

PRESETS = Path(__file__).with_name("presets")
DATA_ENV = "FISHER_DATA"


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline on a preset and write a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = sorted(f.stem for f in PRESETS.glob("*.json"))
    p.add_argument("--preset", default="mnist-small", help=f"preset name ({', '.join(names)}) or a JSON file")
    p.add_argument("--data", default=os.environ.get(DATA_ENV),
                   help=f"raw dataset folder: the MNIST idx files, or the CelebA folder (default: ${DATA_ENV}; "
                        "MNIST is downloaded when neither is given and the network is reachable)")
    p.add_argument("--out", default="runs/latest", help="run directory (default runs/latest)")
    p.add_argument("--fid-weights", default=os.environ.get("FISHER_FID_WEIGHTS"),
                   help="FID Inception weights file (pytorch-fid's pt_inception-2015-12-05); "
                        "default $FISHER_FID_WEIGHTS, else pytorch-fid downloads them")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset value (JSON values: --set prior.epochs=5 --set embed.gpu=true)")
    add_ray_args(p)
    p.set_defaults(func=run)


def load_preset(name: str, overrides: list[str]) -> dict:
    path = Path(name) if name.endswith(".json") else PRESETS / f"{name}.json"
    if not path.exists():
        have = ", ".join(sorted(f.stem for f in PRESETS.glob("*.json")))
        raise FisherError(f"--preset {name}: no such preset (have {have}, or pass a .json file)")
    preset = json.loads(path.read_text())
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
    _check_keys(preset, path, overrides)
    preset["_name"] = path.stem
    return preset


SECTION_STAGES = {"prepare": "prepare", "prior": "train-prior", "embed": "embed", "decoder": "train-decoder",
                  "interpolate": "interpolate", "evaluate": "evaluate", "sweep": "sweep"}   # preset section → command


def _check_keys(preset: dict, path: Path, overrides: list[str]) -> None:
    """Every key of a section must be an option of its command: a typo fails now, not after an hour of steps."""
    import difflib

    from raycluster import cli
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for section, stage in SECTION_STAGES.items():
        flags = {f for a in commands[stage]._actions for f in a.option_strings if f.startswith("--")}
        for key in preset.get(section) or {}:
            flag = "--" + key.replace("_", "-")
            if flag not in flags:
                where = next((f"--set {o}" for o in overrides if o.partition("=")[0] == f"{section}.{key}"), str(path))
                close = difflib.get_close_matches(flag, flags, n=1)
                raise FisherError(f"{where}: `fisher {stage}` has no option {flag}"
                                  + (f"; did you mean {section}.{close[0][2:].replace('-', '_')}?" if close else ""))


def _flags(section: dict, skip: tuple = ()) -> list[str]:
    """{"batch_size": 128, "gpu": true} → ["--batch-size", "128", "--gpu"]."""
    out = []
    for key, value in section.items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


class _Runner:
    """Runs stages through the CLI in-process, skipping finished ones and timing the rest."""

    def __init__(self, out: str, ray_flags: list[str]):
        self.out, self.ray_flags = out, ray_flags
        uri = join(out, "timings.json")
        self.timings = json.loads(read_bytes(uri)) if exists(uri) else {}

    def step(self, name: str, argv: list[str], done_file: str, hint: str = "") -> None:
        from raycluster import cli
        if exists(join(self.out, done_file)):
            print(f"[run] {name}: done before, reused", flush=True)
            return
        print(f"[run] {name}: fisher {' '.join(argv)}", flush=True)
        started = time.time()
        if cli.main([*argv, *self.ray_flags]) != 0:
            raise FisherError(f"step '{name}' failed (see the error above){hint}; fix it and rerun `fisher run` "
                              "to continue")
        self.timings[name] = round(time.time() - started, 1)
        atomic_write_bytes(join(self.out, "timings.json"), json.dumps(self.timings, indent=2).encode())


def run(args) -> None:
    from fisher.embedding import EmbedSpec
    preset = load_preset(args.preset, args.set)
    out, dataset = args.out, preset["dataset"]
    if dataset == "celeba" and not args.data:
        raise FisherError(f"celeba needs --data (or ${DATA_ENV}): the folder with img_align_celeba/, "
                          "list_attr_celeba.txt and list_eval_partition.txt")
    ray_flags = [f for f in (["--address", args.address] if args.address else []) +
                 (["--num-cpus", str(args.num_cpus)] if args.num_cpus else [])]
    r = _Runner(out, ray_flags)
    atomic_write_bytes(join(out, "preset.json"), json.dumps(preset, indent=2).encode())
    d = lambda *p: join(out, *p)                                            # noqa: E731

    src = ["--src", args.data] if args.data else []
    r.step("prepare", ["prepare", dataset, *src, "--out", d("data"), *_flags(preset["prepare"])], "data/manifest.json",
           hint="" if args.data else f"; pass --data DIR (or set ${DATA_ENV}) with the raw {dataset} files")
    r.step("train-prior", ["train-prior", "--data", d("data"), "--out", d("prior"), *_flags(preset["prior"])],
           "prior/manifest.json")

    emb = preset["embed"]
    density = None if emb.get("density") in (None, "auto") else float(emb["density"])
    spec = EmbedSpec(int(emb["dim"]), density)
    sweep = preset.get("sweep")
    grid = None
    if sweep:
        import tune_spaces
        grid = tune_spaces.load_grid(sweep["grid"], flag="sweep.grid")
        r.step("sweep", ["sweep", "--prior", d("prior"), "--data", d("data"), "--out", d("sweep"), "--resume",
                         "--seed", str(emb.get("seed", 0)), "--embed-actors", str(emb.get("actors", 1)),
                         *_flags(sweep)], "sweep/manifest.json")
    in_grid = grid is not None and spec.dim in grid["dim"] and spec.density in grid["density"] and not emb.get("pca")
    if in_grid:             # the Fisher embedding is one of the sweep's cells: reuse that gradient pass
        fisher_dir, fisher_col = d("sweep", "embeddings"), spec.column(single=len(grid["dim"]) * len(grid["density"]) == 1)
    else:
        fisher_dir, fisher_col = d("emb-fisher"), "z_t" if emb.get("pca") or emb.get("standardize") else "z"
    projection = ["--dim", str(spec.dim), "--density", "auto" if density is None else str(density),
                  *_flags(emb, skip=("dim", "density"))]
    if not in_grid:
        r.step("embed-fisher", ["embed", "--prior", d("prior"), "--data", d("data"), "--out", fisher_dir,
                                "--kind", "fisher", *projection], "emb-fisher/manifest.json")
    act_col = "z_t" if emb.get("pca") or emb.get("standardize") else "z"
    r.step("embed-activation", ["embed", "--prior", d("prior"), "--data", d("data"), "--out", d("emb-activation"),
                                "--kind", "activation", *projection], "emb-activation/manifest.json")

    kinds = {"fisher": (fisher_dir, fisher_col), "activation": (d("emb-activation"), act_col)}
    dec = preset["decoder"]
    ev = dict(preset["evaluate"])
    weights = ["--fid-weights", args.fid_weights] if args.fid_weights else []
    for kind, (edir, col) in kinds.items():
        common = ["--embeddings", edir, "--data", d("data"), "--column", col]
        r.step(f"decoder-{kind}", ["train-decoder", *common, "--out", d(f"decoder-{kind}"), *_flags(dec)],
               f"decoder-{kind}/manifest.json")
        r.step(f"interpolate-{kind}", ["interpolate", "--decoder", d(f"decoder-{kind}"), *common,
                                       "--out", d(f"interpolate-{kind}"), *_flags(preset["interpolate"])],
               f"interpolate-{kind}/manifest.json")
        if preset.get("edit"):
            r.step(f"edit-{kind}", ["edit", "--decoder", d(f"decoder-{kind}"), *common, "--out", d(f"edit-{kind}"),
                                    "--attribute", ",".join(preset["edit"]["attributes"]),
                                    "--scale", str(preset["edit"]["scale"])], f"edit-{kind}/manifest.json")
        r.step(f"fid-{kind}", ["evaluate", "--decoder", d(f"decoder-{kind}"), *common, "--out", d(f"fid-{kind}"),
                               "--label", f"{kind}/{dec['decoder']}", *weights, *_flags(ev)],
               f"fid-{kind}/fid.json")
    from fisher.reports.run import write_report
    report = write_report(out, preset, kinds, r.timings, paper_preset=_paper_preset(preset["dataset"]))
    print(f"report: {report}")


def _paper_preset(dataset: str) -> dict | None:
    """The paper-scale preset of ``dataset`` (``presets/<dataset>-paper.json``), for the report's comparison."""
    path = PRESETS / f"{dataset}-paper.json"
    return json.loads(path.read_text()) if path.exists() else None
