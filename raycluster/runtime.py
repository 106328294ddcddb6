"""Starting or joining Ray, and the options every stage shares."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from raycluster.options import add_options, at_least, option, positive


@dataclass(kw_only=True)
class RayOptions:
    """The options every stage shares: which Ray to use."""
    address: str | None = option(None, help="Ray cluster to join ('auto' inside `ray job submit`); default: start a "
                                            "local Ray")
    num_cpus: int | None = option(None, help="logical CPUs for a local Ray (default: this machine's cores)")
    _groups = {"address": "Ray", "num_cpus": "Ray"}

    def __post_init__(self):
        at_least(self, 1, "num_cpus")


@dataclass(kw_only=True)
class TrainerOptions(RayOptions):
    """What every Ray Train stage shares (defaults: the paper's, sec. 5.2: Adam 1e-3, batch 128)."""
    epochs: int = option(10, help="training epochs")
    batch_size: int = option(128, help="(global) batch size (paper: 128)")
    lr: float = option(1e-3, help="Adam learning rate (paper: 1e-3)")
    seed: int = option(0, help="initialisation and shuffling seed")
    gpu: bool = option(False, help="one GPU per worker")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per worker (fractions allowed, default 1)")
    max_failures: int = option(3, help="worker failures to recover from")
    _groups = {**RayOptions._groups, **{k: "training" for k in ("epochs", "batch_size", "lr", "seed", "gpu",
                                                               "cpus_per_worker", "max_failures")}}

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "epochs", "batch_size")
        at_least(self, 0, "seed", "max_failures")
        positive(self, "lr", "cpus_per_worker")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """The Ray options, for a stage whose options are not a dataclass yet."""
    add_options(p, RayOptions)


def init_ray(args) -> dict:
    """Join ``--address`` or start a local Ray bound to loopback; returns the cluster resources."""
    import ray
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            loopback_only()
            ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    return ray.cluster_resources()


def node_types(local: bool = False) -> tuple[dict[str, dict], str] | None:
    """The largest nodes this cluster can ever have: ``({name: resources}, source)``; None when unknown.

    The live nodes, plus the node types the autoscaler may add. The types come from the cluster
    config that autoscaler v2 reports to the GCS, else from the config file the autoscaler runs with
    (``--autoscaling-config`` of its monitor process, found by this cluster's GCS address: on a ``ray
    up`` cluster the head's ``~/ray_bootstrap_config.yaml``, on the machine where a submitted job's
    driver runs). None when an autoscaler may be running but its node types cannot be read (a driver
    on another machine than the monitor): requests are then not checked. Without an autoscaler
    (``local``: the Ray this command started) the live nodes are all there will be."""
    import json

    import ray
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get
    live = {f"live node {n['NodeID'][:8]}": {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n["Alive"]}
    if local:
        return live, "the Ray started by this command"
    config = state.get_cluster_config()
    if config and config.node_group_configs:
        return {**live, **{g.name: dict(g.resources) for g in config.node_group_configs if g.max_count != 0}}, \
            "the cluster config in the GCS (autoscaler v2)"
    path = _autoscaling_config_path(ray.get_runtime_context().gcs_address)
    if path:
        import yaml
        with open(path) as f:
            cfg = yaml.safe_load(f)
        types = {name: t.get("resources", {}) for name, t in (cfg.get("available_node_types") or {}).items()
                 if t.get("max_workers", cfg.get("max_workers", 1)) or t.get("min_workers")}
        return {**live, **types}, f"the autoscaler's config {path}"
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)       # written by the v1 monitor
    if is_autoscaler_v2(fetch_from_server=True) or status is None or "autoscaler_report" in json.loads(status):
        return None
    return live, "the live nodes (the cluster has no autoscaler)"


def _autoscaling_config_path(gcs_address: str) -> str | None:
    """``--autoscaling-config`` of this cluster's autoscaler monitor, if it runs on this machine."""
    import psutil
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a.endswith("monitor.py") for a in cmd) and f"--gcs-address={gcs_address}" in cmd:
            for a in cmd:
                if a.startswith("--autoscaling-config="):
                    path = os.path.expanduser(a.split("=", 1)[1])
                    return path if os.path.isfile(path) else None
    return None


def check_fits(args, request: dict, options: dict, per: str = "actor") -> None:
    """Refuse, with one line naming the option, a per-actor (per-trial, per-worker) resource request
    that no node of the cluster can ever satisfy: Ray would leave it pending forever. ``options``
    maps each resource of ``request`` to the option that asked for it (``{"CPU": "--cpus-per-actor 12"}``)."""
    from fisher.io import FisherError
    request = {k: v for k, v in request.items() if v}
    known = node_types(local=not (args.address or os.environ.get("RAY_ADDRESS")))
    if known is None:
        print(f"note: the autoscaler's node types are not readable from here; not checking {per} resources "
              f"{request} against them", flush=True)
        return
    types, source = known
    if not types or any(all(res.get(k, 0) >= v for k, v in request.items()) for res in types.values()):
        return
    short, types = _shortfall(request, types)
    name = max(sorted(types), key=lambda n: (types[n].get(short, 0), *(types[n].get(k, 0) for k in request)))
    offer = ", ".join(f"{k} {types[name].get(k, 0):g}" for k in request)
    raise FisherError(f"{options[short]}: asks {short} {request[short]:g} per {per}, more than any node of this "
                      f"cluster can offer (largest node type: {name} with {offer}; from {source}); lower "
                      f"{options[short].split()[0]} or add a larger node type")


def _shortfall(request: dict, types: dict) -> tuple[str, dict]:
    """The resource to name, and the node types to compare it with: one that no type has enough of,
    else one that the types holding the rest of the request lack (CPUs on the GPU types)."""
    for k in request:
        if all(res.get(k, 0) < request[k] for res in types.values()):
            return k, types
    for k in request:
        rest = {n: r for n, r in types.items() if all(r.get(j, 0) >= v for j, v in request.items() if j != k)}
        if rest:
            return k, rest
    return next(iter(request)), types


def loopback_only() -> None:
    """Keep a local Ray on 127.0.0.1. Ray turns a 127.0.0.1 node address into this machine's own IP
    (``resolve_ip_for_localhost``), and its GCS, raylet and workers then listen on every interface;
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps them on loopback. Set for this process (whose
    ``ray_constants`` is already imported) and the Ray processes it starts."""
    from ray._private import ray_constants
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def worker_threads(resources: dict, workers: int) -> int:
    """Torch threads per worker: the cluster's CPUs shared among the workers (at least 1)."""
    return max(1, int(resources.get("CPU", 1)) // max(workers, 1))


def read_shards(files: list[str], columns: list[str], include_paths: bool = False):
    """Ray Dataset over Parquet shards, split into row-group-sized blocks.

    Ray Data packs Parquet files into 128 MiB read units, which would turn a
    small dataset into a single block (and a single busy actor); shards are
    written with small row groups (``fisher.io.ROW_GROUP``) and read one row
    group per unit.
    """
    import ray.data
    if not ray.is_initialized():        # Ray Data would start a default Ray: every interface, a dashboard
        raise RuntimeError("read_shards: call init_ray(args) first")
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(1 << 20))
    return ray.data.read_parquet(files, include_paths=include_paths).select_columns(columns)


def torch_trainer(loop, loop_config: dict, args, name: str, workers: int = 1, datasets: dict | None = None):
    """A Ray Train ``TorchTrainer`` for a stage: checkpoints (last 2) under ``<--out>/ray/<name>``,
    ``--max-failures`` worker restarts, ``--gpu`` / ``--cpus-per-worker`` per worker, torch threads
    set from the cluster's CPUs (``loop_config['threads']``)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    resources = init_ray(args)
    check_fits(args, {"CPU": args.cpus_per_worker, "GPU": int(args.gpu)},
               {"CPU": f"--cpus-per-worker {args.cpus_per_worker:g}", "GPU": "--gpu"}, per="worker")
    storage = f"{args.out.rstrip('/')}/ray" if "://" in args.out else os.path.abspath(os.path.join(args.out, "ray"))
    return TorchTrainer(
        loop, train_loop_config={**loop_config, "threads": worker_threads(resources, workers)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=args.gpu,
                                               resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=args.max_failures)),
        datasets=datasets)


def fit(trainer, out: str):
    """``trainer.fit()``; a failure becomes one FisherError line carrying the workers' own error."""
    from fisher.io import FisherError
    try:
        return trainer.fit()
    except Exception as e:  # ray.train.WorkerGroupError, ControllerError, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line.split("FisherError:", 1)[1].strip() for line in reversed(lines) if "FisherError:" in line),
                     lines[-1] if lines else type(e).__name__)
        raise FisherError(f"{out}: training failed: {cause}") from e


def device(gpu: bool) -> str:
    """The torch device of a stage's ``--gpu`` flag."""
    return "cuda" if gpu else "cpu"


def report_files(report, checkpoint_cls, metrics: dict, files: dict[str, bytes]) -> None:
    """``report(metrics, checkpoint=...)`` (``ray.train.report`` or ``ray.tune.report``) with a checkpoint
    holding ``files`` (:func:`fisher.checkpoints.train_state_files`)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        report(metrics, checkpoint=checkpoint_cls.from_directory(tmp))


def checkpoint_files(checkpoint) -> dict[str, bytes] | None:
    """The files of a Ray checkpoint (None for no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        out = {}
        for n in os.listdir(d):
            with open(os.path.join(d, n), "rb") as f:
                out[n] = f.read()
        return out


def finished_run(out: str, stage: str, stage_config: dict, inputs: dict) -> bool:
    """True if ``out`` holds this finished run. A finished run of the same config with fewer
    epochs is continued (False); any other content of ``out`` is an error."""
    from fisher.io import MANIFEST, FisherError, claim_output, exists, join, read_manifest
    if not exists(join(out, MANIFEST)):
        return False
    claim_output(out, stage)
    old = read_manifest(out)
    same = {k: v for k, v in old.get("config", {}).items() if k != "epochs"} == \
        {k: v for k, v in stage_config.items() if k != "epochs"}
    if old.get("stage") != stage or not same or old.get("inputs") != inputs:
        raise FisherError(f"{out}: holds a {old.get('stage')} run with another config or inputs; pass a new --out")
    done = old["config"]["epochs"]
    if done > stage_config["epochs"]:
        raise FisherError(f"{out}: already trained for {done} epochs, more than --epochs {stage_config['epochs']}")
    return done == stage_config["epochs"]


def publish_checkpoint(checkpoint, out: str, names) -> dict[str, str]:
    """Copy files of a Ray checkpoint to the top of ``out`` (atomically); returns their sha256 by name."""
    import hashlib

    from fisher.io import atomic_write_bytes, join
    digests = {}
    files = checkpoint_files(checkpoint)
    for name in names:
        atomic_write_bytes(join(out, name), files[name])
        digests[name] = hashlib.sha256(files[name]).hexdigest()
    return digests
