"""``fisher sweep``: the projection density × dimension reconstruction grid
(paper Figure 3a), one decoder per grid cell, with Ray Tune.

1. Embeddings. Every cell of the grid (``--grid``: the tune_spaces name
   ``paper_grid``, densities 0.001, 0.01, 0.1, 1 × dims 64, 256, 1024, or a
   JSON file with the same ``density`` and ``dim`` lists) is a projection of
   the same Fisher scores, so all of them come from ONE gradient pass: the
   sweep runs the ``fisher embed`` stage into ``OUT/embeddings`` with the
   grid's dims and densities (columns ``z_d<dim>_p<density>``). That stage
   skips finished shards, so a rerun reuses what is there.
2. Decoders. Ray Tune runs one trial per cell that is not finished yet
   (a function trainable; ``--cpus-per-trial`` may be fractional,
   ``--max-concurrent`` trials at a time). A trial joins its column to the
   images by id, trains ``fisher.decoders.fit_decoder`` on the train split,
   reports the test reconstruction error to Tune after every epoch (with a
   checkpoint, so a failed trial restarts from its last epoch,
   ``--max-failures``), and finally writes ``OUT/cells/<column>.json``: that
   file is the record of a finished cell.
3. Report. ``OUT/grid.md`` holds the paper's layout (rows: dimension,
   columns: density) of the test BCE in nats per pixel and of the MSE;
   ``OUT/grid.png`` the same as annotated heat-maps (both made by
   :mod:`fisher.reports.figure3a`); ``OUT/manifest.json`` the config, the
   input hashes and every cell's result.

``--resume`` keeps the cells whose record exists and trains only the
missing ones (after an interrupted or partly failed sweep); without it every
cell is trained again. ``OUT/_plan.json`` records the config the directory
was started with (grid, kind, seed, decoder, epochs, batch size, lr, prior
and data); an ``--out`` started with another config is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import tune_spaces
from fisher.decoders import DECODERS, DecoderTrainConfig
from fisher.data import data_levels
from fisher.embedding import EmbedSpec
from fisher.io import (
    FisherError,
    atomic_write_bytes,
    claim_output,
    exists,
    join,
    manifest_hash,
    ray_storage,
    read_json,
    read_manifest,
    write_manifest,
)
from raycluster import console
from raycluster.options import add_options, at_least, option, positive, ray_quantities, seeds
from raycluster.runtime import RayOptions, check_fits, init_ray

CELLS = "cells"           # OUT/cells/<column>.json: one record per finished cell
SPLITS = ("train", "test")


@dataclass(kw_only=True)
class SweepOptions(RayOptions):
    """Options of ``fisher sweep`` (decoder defaults: the paper's, sec. 5.1)."""
    prior: str = option(help="prior checkpoint directory (from `fisher train-prior`)")
    data: str = option(help="prepared data directory (from `fisher prepare`)")
    out: str = option(help="sweep directory to write: embeddings/, cells/, tune/, grid.md, grid.png, manifest.json")
    grid: str = option("paper_grid", help="search space: a tune_spaces name (paper_grid: densities 0.001,0.01,0.1,1 "
                                          "× dims 64,256,1024) or a JSON file with 'density' and 'dim' lists")
    kind: str = option("fisher", choices=("fisher", "activation"),
                       help="Fisher scores (the method) or hidden activations (the paper's baseline)")
    seed: int | None = option(None, help="projection seed and decoder initialisation/shuffling seed (default: the "
                                         "grid's 'seed', else 0)")
    epochs: int = option(10, help="decoder training epochs per cell")
    batch_size: int = option(128, help="decoder batch size (paper: 128)")
    lr: float = option(1e-3, help="decoder Adam learning rate (paper: 1e-3)")
    decoder: str = option("conv", help="decoder architecture: a registered name")
    max_concurrent: int | None = option(None, help="trials running at once (default: on a cluster (--address) all, "
                                                   "and the autoscaler adds nodes for them; locally what the machine "
                                                   "fits, one per whole CPU (or per --gpus-per-trial share of the GPUs))")
    cpus_per_trial: float = option(0.5, help="CPUs reserved per trial; fractional allowed (a whole-CPU request can "
                                             "stall a 2-core machine); the trial uses max(1, int(this)) torch threads")
    gpus_per_trial: float = option(0.0, help="GPUs per trial (fractional allowed); > 0 trains the decoders on GPU")
    max_failures: int = option(1, help="times a failed trial is restarted from its last epoch checkpoint")
    resume: bool = option(False, help="keep the cells already finished in OUT/cells and train only the missing ones")
    embed_actors: int = option(1, help="actors computing the embeddings")
    embed_gpu: bool = option(False, help="one GPU per embedding actor")

    def __post_init__(self):
        super().__post_init__()
        if self.decoder not in DECODERS:
            raise FisherError(f"--decoder {self.decoder}: unknown (have {', '.join(DECODERS.names())})")
        at_least(self, 1, "epochs", "batch_size", "embed_actors", "max_concurrent")
        at_least(self, 0, "max_failures", "gpus_per_trial")
        seeds(self, "seed")
        positive(self, "lr", "cpus_per_trial")
        ray_quantities(self, "cpus_per_trial", "gpus_per_trial")


def register(sub) -> None:
    p = sub.add_parser("sweep", help="density × dimension reconstruction grid (paper Figure 3a) with Ray Tune",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, SweepOptions)
    p.set_defaults(func=run, options=SweepOptions)


# ---------------------------------------------------------------- the grid

def grid_cells(grid: dict) -> list[dict]:
    """One cell per (dim, density), with its embedding column (as ``fisher embed`` names it)."""
    single = len(grid["dim"]) * len(grid["density"]) == 1
    return [{"dim": dim, "density": dens, "column": EmbedSpec(dim, dens).column(single)}
            for dim in grid["dim"] for dens in grid["density"]]


# ---------------------------------------------------------------- the stage

def run(args: SweepOptions) -> None:
    grid = tune_spaces.load_grid(args.grid)      # the grid's own checks; one-line errors naming --grid
    data_manifest = read_manifest(args.data, "prepare")
    from fisher.priors import prior_location
    prior_manifest = read_manifest(prior_location(args.prior), "train-prior")
    missing = [s for s in SPLITS if s not in data_manifest.get("counts", {})]
    if missing:
        raise FisherError(f"{args.data}: no {'/'.join(missing)} split (has {sorted(data_manifest.get('counts', {}))}); "
                          "the sweep trains on 'train' and reports on 'test'")
    from fisher.decoders import build_decoder
    build_decoder(args.decoder, min(grid["dim"]), data_manifest["image_shape"],   # refuse a misfit before any work
                  data_levels(data_manifest))
    seed = args.seed if args.seed is not None else int(grid.get("seed", 0))
    train = DecoderTrainConfig(decoder=args.decoder, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, seed=seed)
    plan = {"grid": {"density": grid["density"], "dim": grid["dim"]}, "kind": args.kind, "seed": seed,
            "decoder": train.to_dict(), "prior": manifest_hash(prior_manifest),
            "prior_weights_sha256": prior_manifest.get("weights_sha256"), "data": manifest_hash(data_manifest)}
    plan_id = manifest_hash(plan)
    claim_output(args.out, "sweep", plan)
    cells = grid_cells(grid)
    started = time.time()

    init_ray(args)                  # trials no node can hold are refused before the embeddings are computed
    check_fits(args, {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial},
               {"CPU": f"--cpus-per-trial {args.cpus_per_trial:g}", "GPU": f"--gpus-per-trial {args.gpus_per_trial:g}"},
               per="trial")
    emb_dir = join(args.out, "embeddings")
    _embed(args, emb_dir, grid, seed)
    emb_manifest = read_manifest(emb_dir, "embed")
    embed_seconds = round(time.time() - started, 3)

    done = {c["column"]: rec for c in cells if (rec := _finished(args.out, c, plan_id))} if args.resume else {}
    todo = [c for c in cells if c["column"] not in done]
    console.say(f"sweep: {len(done)} of {len(cells)} cells already done; training {len(todo)} decoder(s) "
          f"({args.decoder}, {args.epochs} epoch(s)) with Ray Tune")
    if not args.resume and any(exists(_cell_uri(args.out, c["column"])) for c in cells):
        console.say("sweep: retraining cells that already have a record (pass --resume to keep them)")
    if todo:
        _tune(args, todo, {
            "embeddings": _abs(emb_dir), "data": _abs(args.data), "out": _abs(args.out), "plan": plan_id,
            "train": train.to_dict(), "image_shape": data_manifest["image_shape"],
            "levels": data_levels(data_manifest), "kind": args.kind,
            "threads": max(1, int(args.cpus_per_trial)), "gpu": args.gpus_per_trial > 0,
            "density_values": {c: v.get("density") for c, v in emb_manifest["columns"].items()}})

    records = []
    for c in cells:
        rec = _finished(args.out, c, plan_id)
        if rec is None:
            raise FisherError(f"{_cell_uri(args.out, c['column'])}: missing after the Tune run; "
                              "rerun with --resume to train the missing cells")
        records.append(rec)
    _write_report(args, grid, records, plan)
    write_manifest(args.out, "sweep", plan,
                   inputs={"prior": plan["prior"], "data": plan["data"], "embeddings": manifest_hash(emb_manifest)},
                   prior=args.prior, data=args.data, embeddings=emb_dir, grid_source=args.grid,
                   image_shape=data_manifest["image_shape"], levels=data_levels(data_manifest),
                   cells=[{k: v for k, v in r.items() if k != "history"} for r in records],
                   table="grid.md", plot="grid.png",
                   timing={"embed_seconds": embed_seconds, "seconds": round(time.time() - started, 3),
                           "cells_trained": len(todo)})
    console.say(f"sweep: Figure 3a table written to {join(args.out, 'grid.md')} (heat-map: grid.png)")


def _abs(uri: str) -> str:
    """Absolute local path (Tune runs trials in their own working directories) or the URI unchanged."""
    return uri if "://" in str(uri) else os.path.abspath(os.path.expanduser(str(uri)))


def _cell_uri(out: str, column: str) -> str:
    return join(out, CELLS, f"{column}.json")


def _finished(out: str, cell: dict, plan_id: str) -> dict | None:
    """The record of a finished cell made with this plan; None when absent; refuse a foreign one."""
    uri = _cell_uri(out, cell["column"])
    if not exists(uri):
        return None
    rec = read_json(uri, "cell record", "delete it and rerun with --resume")
    if rec.get("plan") != plan_id:
        raise FisherError(f"{uri}: made by a sweep with another config (plan {rec.get('plan')}, now {plan_id}); "
                          "pass a new --out")
    return rec


def _embed(args: SweepOptions, emb_dir: str, grid: dict, seed: int) -> None:
    """All cells' projections in one gradient pass: the ``fisher embed`` stage, in-process."""
    from raycluster import embed
    embed.run(embed.EmbedOptions(prior=args.prior, data=args.data, out=emb_dir, kind=args.kind, dim=grid["dim"],
                                 density=grid["density"], seed=seed, splits=list(SPLITS), actors=args.embed_actors,
                                 gpu=args.embed_gpu, address=args.address, num_cpus=args.num_cpus))


# ---------------------------------------------------------------- Ray Tune

def _train_cell(config: dict, job: dict) -> None:
    """Tune function trainable: one grid cell = fisher.decoders.fit_decoder on one embedding column."""
    import ray.tune
    import torch

    from fisher.checkpoints import read_train_state, train_state_files
    from fisher.decoders import fit_decoder, load_split_tensors
    from raycluster.runtime import checkpoint_files, device, report_files

    torch.set_num_threads(job["threads"])
    cell, cfg = config["cell"], DecoderTrainConfig.from_dict(job["train"])
    column = cell["column"]
    started = time.time()
    tensors = load_split_tensors(job["embeddings"], job["data"], column, device(job["gpu"]), SPLITS)
    files = checkpoint_files(ray.tune.get_checkpoint())     # a restarted trial: continue after its last epoch
    start = read_train_state(files) if files else None
    history = start["history"] if start else []
    tags = {"cell": column, "dim": cell["dim"], "density": cell["density"]}

    def on_epoch(epoch, metrics, decoder, opt):
        history.append(metrics)
        report_files(ray.tune.report, ray.tune.Checkpoint, {**metrics, **tags},
                     train_state_files(decoder, "decoder", opt, epoch, history, metrics))

    _, metrics = fit_decoder(cfg, *tensors["train"], *tensors["test"], job["levels"], job["image_shape"],
                             on_epoch=on_epoch, start=start)
    record = {**cell, "density_value": job["density_values"].get(column), "kind": job["kind"],
              "epochs": cfg.epochs, "plan": job["plan"], "decoder": job["train"],
              "n_train": int(tensors["train"][0].shape[0]), "n_test": int(tensors["test"][0].shape[0]),
              **{k: v for k, v in metrics.items() if k.startswith(("test_", "train_"))},
              "seconds": round(time.time() - started, 3), "history": history}
    atomic_write_bytes(_cell_uri(job["out"], column), json.dumps(record, indent=2).encode())


def _trial_name(trial) -> str:
    return trial.config["cell"]["column"]


def _trial_dirname(trial) -> str:
    return f"{trial.config['cell']['column']}_{trial.trial_id}"


def _tune(args, todo: list[dict], job: dict) -> None:
    from ray import tune

    resources = init_ray(args)
    per_trial = {"cpu": args.cpus_per_trial, **({"gpu": args.gpus_per_trial} if args.gpus_per_trial else {})}
    if args.max_concurrent:
        concurrent = args.max_concurrent
    elif args.address or os.environ.get("RAY_ADDRESS"):     # a cluster: pending trials are demand the autoscaler
        concurrent = len(todo)                               # meets (what is up now may be zero workers)
    else:
        concurrent = max(1, int(resources.get("CPU", 1) // max(1.0, args.cpus_per_trial)))
        if args.gpus_per_trial:
            concurrent = min(concurrent, max(1, int(resources.get("GPU", 0) // args.gpus_per_trial)))
    concurrent = min(concurrent, len(todo))
    storage, filesystem = ray_storage(join(args.out, "tune"))    # a URI: its path on the resolved filesystem
    progress = _progress(len(todo), args.epochs)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_train_cell, job=job), per_trial),
        param_space={"cell": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="sweep", storage_path=storage, storage_filesystem=filesystem, verbose=1,
                                  callbacks=[progress],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures)))
    console.say(f"sweep: {len(todo)} trial(s), {concurrent} at a time, {per_trial} each; Tune results in "
                f"{join(args.out, 'tune') if filesystem else storage}/sweep")
    try:
        results = tuner.fit()
    finally:
        progress.bar.close()
    failed = [r for r in results if r.error is not None]
    if failed:
        first = failed[0]
        lines = [ln for ln in str(first.error).strip().splitlines() if ln.strip()]
        raise FisherError(f"{len(failed)} of {len(todo)} cells failed (first: {first.config['cell']['column']}: "
                          f"{lines[-1].strip() if lines else type(first.error).__name__}); finished cells are kept "
                          f"in {join(args.out, CELLS)}: fix the cause and rerun with --resume")


def _progress(cells: int, epochs: int):
    """A Tune callback (it runs in the driver) moving the sweep's bar: epochs done over all cells."""
    from ray import tune

    class CellProgress(tune.Callback):
        def __init__(self):
            self.bar = console.progress(cells * epochs, f"sweep ({cells} cells)", unit="epoch")
            self.epochs: dict[str, int] = {}
            self.finished = 0

        def __getstate__(self):         # Tune saves its run config (callbacks too) with the experiment
            return {k: v for k, v in self.__dict__.items() if k != "bar"}

        def __setstate__(self, state):
            self.__dict__.update(state, bar=None)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.epochs[trial.trial_id] = int(result.get("epoch", 0))
            if self.bar is not None:
                self.bar.update(sum(self.epochs.values()) - self.bar.n)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            if self.bar is not None:
                self.bar.set_postfix_str(f"{self.finished}/{cells} cells done, last {trial.config['cell']['column']}")

    return CellProgress()


# ---------------------------------------------------------------- the report

def _write_report(args, grid: dict, records: list[dict], plan: dict) -> None:
    """``grid.md`` and ``grid.png``: :mod:`fisher.reports.figure3a` (paper Figure 3a layout)."""
    from fisher.reports import figure3a
    md = figure3a.grid_markdown(grid, records, plan, prior=args.prior, data=args.data)
    atomic_write_bytes(join(args.out, "grid.md"), md.encode())
    atomic_write_bytes(join(args.out, "grid.png"), figure3a.grid_png(grid, records))
