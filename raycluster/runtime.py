"""Starting or joining Ray, and the options every stage shares."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

from raycluster import console
from raycluster.options import add_options, at_least, at_most, option, positive, ray_quantities, seeds


@dataclass(kw_only=True)
class RayOptions:
    """The options every stage shares: which Ray to use."""
    address: str | None = option(None, help="Ray cluster to join ('auto' inside `ray job submit`); default: start a "
                                            "local Ray")
    num_cpus: int | None = option(None, help="logical CPUs for a local Ray (default: this machine's cores)")
    _groups = {"address": "Ray", "num_cpus": "Ray"}

    def __post_init__(self):
        at_least(self, 1, "num_cpus")
        at_most(self, 1 << 16, "num_cpus")


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
        at_most(self, 100_000, "epochs", "max_failures")
        at_most(self, 1 << 20, "batch_size")
        at_least(self, 0, "max_failures")
        seeds(self, "seed")
        positive(self, "lr", "cpus_per_worker")
        ray_quantities(self, "cpus_per_worker")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """The Ray options, for a stage whose options are not a dataclass yet."""
    add_options(p, RayOptions)


ADDRESS_WAIT_S = 10        # how long an --address may take to answer before the stage gives up


def check_address(address: str) -> None:
    """Refuse an ``--address`` where nothing answers within ``ADDRESS_WAIT_S`` (Ray itself retries forever)."""
    import socket
    from fisher.io import FisherError
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise FisherError(f"--address {address}: expected HOST:PORT of the Ray head (e.g. 10.0.0.2:6379), "
                          "ray://HOST:PORT, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_WAIT_S).close()
    except OSError as e:
        raise FisherError(f"--address {address}: nothing answers there ({e.strerror or e}; waited at most "
                          f"{ADDRESS_WAIT_S} s); check the address and that the head is up (`ray status`)") from e


def _requests(args) -> tuple[float, float, str, str]:
    """(CPUs, GPUs) that one worker, actor or trial of this stage needs at once, and the options asking."""
    cpus, gpus, flags = 0.0, 0.0, []
    workers = getattr(args, "workers", 1) if hasattr(args, "cpus_per_worker") else 1
    for name in ("cpus_per_worker", "cpus_per_actor", "cpus_per_trial"):
        if getattr(args, name, None):
            value = getattr(args, name) * (workers if name == "cpus_per_worker" else 1)
            if value > cpus:
                cpus = value
                flags = [f"--{name.replace('_', '-')} {getattr(args, name)}"]
                if name == "cpus_per_worker" and workers > 1:
                    flags.append(f"x --workers {workers}")
    gpu_flag = "--gpu"
    for name, per in (("gpu", 1.0), ("embed_gpu", 1.0), ("gpus_per_trial", None)):
        value = getattr(args, name, None)
        if value and (per or float(value)) > gpus:
            gpus, gpu_flag = per or float(value), f"--{name.replace('_', '-')}"
    return cpus, gpus, " ".join(flags), gpu_flag


def check_resources(args) -> None:
    """Refuse, before Ray starts, what a local Ray can never schedule (Ray would wait forever): a GPU on a
    machine without one, more CPUs for one worker (all Train workers at once) than the local Ray has.
    On a cluster the autoscaler may add nodes, so nothing is refused there."""
    import ray
    from fisher.io import FisherError
    if getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"):
        return
    cpus, gpus, flags, gpu_flag = _requests(args)
    if ray.is_initialized():
        have = ray.cluster_resources()
        have_cpus, have_gpus = have.get("CPU", 0), have.get("GPU", 0)
    else:
        import torch
        have_cpus = getattr(args, "num_cpus", None) or os.cpu_count()
        have_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have_gpus:
        raise FisherError(f"{gpu_flag}: this machine has {have_gpus:g} GPU(s) for a local Ray; drop {gpu_flag} "
                          "or pass --address of a cluster with GPUs")
    if cpus > have_cpus:
        raise FisherError(f"{flags}: needs {cpus:g} CPUs at once, but the local Ray has {have_cpus:g}; pass a "
                          "smaller value (fractions allowed) or --num-cpus")


def init_ray(args) -> dict:
    """Join ``--address`` or start a local Ray bound to loopback; returns the cluster resources."""
    import ray
    check_resources(args)
    console.work_began()
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            check_address(address)
            ray.init(address=address, log_to_driver=True)
        else:
            loopback_only()
            ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False        # each step draws one bar of its own (raycluster.console)
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
        console.say(f"note: the autoscaler's node types are not readable from here; not checking {per} resources "
              f"{request} against them")
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


def check_memory(args, nbytes: float, what: str) -> None:
    """Refuse, before anything is allocated, a request for more memory than this machine has (a local run;
    on a cluster the nodes are not known before Ray starts and may be larger)."""
    from fisher.io import FisherError
    if getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"):
        return
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > 0.8 * total:
        raise FisherError(f"{what}: needs about {nbytes / 2**30:.1f} GiB, more than 80% of this machine's "
                          f"{total / 2**30:.1f} GiB; pass smaller values (or run on a cluster with --address)")


def worker_threads(resources: dict, workers: int) -> int:
    """Torch threads per worker: the cluster's CPUs shared among the workers (at least 1)."""
    return max(1, int(resources.get("CPU", 1)) // max(workers, 1))


def read_shards(files: list[str], columns: list[str], include_paths: bool = False):
    """Ray Dataset over Parquet shards, split into row-group-sized blocks.

    Ray Data packs Parquet files into 128 MiB read units, which would turn a
    small dataset into a single block (and a single busy actor); shards are
    written with small row groups (``fisher.io.ROW_GROUP``) and read one row
    group per unit. The files are opened through the filesystem :func:`fisher.io.resolve` gives them
    (a gs:// emulator included), passed with their scheme-less paths (``include_paths``: those paths).
    """
    import ray.data

    from fisher.io import ray_storage
    if not ray.is_initialized():        # Ray Data would start a default Ray: every interface, a dashboard
        raise RuntimeError("read_shards: call init_ray(args) first")
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(1 << 20))
    located = [ray_storage(f) for f in files]       # the shards of one artifact: one filesystem
    return ray.data.read_parquet([p for p, _ in located], filesystem=located[0][1] if located else None,
                                 include_paths=include_paths).select_columns(columns)


def torch_trainer(loop, loop_config: dict, args, name: str, workers: int = 1, datasets: dict | None = None):
    """A Ray Train ``TorchTrainer`` for a stage: checkpoints (last 2) under ``<--out>/ray/<name>`` (a URI:
    through the filesystem :func:`fisher.io.resolve` opens, a gs:// emulator included),
    ``--max-failures`` worker restarts, ``--gpu`` / ``--cpus-per-worker`` per worker, torch threads
    set from the cluster's CPUs (``loop_config['threads']``)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    resources = init_ray(args)
    check_fits(args, {"CPU": args.cpus_per_worker, "GPU": int(args.gpu)},
               {"CPU": f"--cpus-per-worker {args.cpus_per_worker:g}", "GPU": "--gpu"}, per="worker")
    from fisher.io import join, ray_storage
    storage, filesystem = ray_storage(join(args.out, "ray"))     # a URI: its path on the resolved filesystem
    return TorchTrainer(
        loop, train_loop_config={**loop_config, "threads": worker_threads(resources, workers)},
        torch_config=node_torch_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=args.gpu,
                                               resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, storage_filesystem=filesystem,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=args.max_failures)),
        datasets=datasets)


_STORE = None      # in the Train worker of rank 0: the TCPStore server of the process group


def _node_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """Rank 0's TCPStore server on a socket bound to this node's Ray address only (127.0.0.1 for a
    local Ray): torch's own store binds every interface (``::``). Returns (address, port)."""
    import socket
    from datetime import timedelta

    import ray
    import torch.distributed as dist
    global _STORE
    addr = ray.util.get_node_ip_address()
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.bind((addr, 0))
    s.listen(128)
    port = s.getsockname()[1]
    _STORE = dist.TCPStore(addr, port, world_size, True, timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=s.detach())
    return addr, port


def _join_process_group(backend: str, rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    """Join the process group through rank 0's store; on a loopback node, gloo / NCCL use ``lo``
    (elsewhere gloo binds the address the node's host name resolves to)."""
    import ipaddress
    from datetime import timedelta

    import torch.distributed as dist
    if ipaddress.ip_address(addr).is_loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    store = _STORE if rank == 0 else dist.TCPStore(addr, port, world_size, False, timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def node_torch_config():
    """Ray Train's ``TorchConfig`` with the process group's store bound to rank 0's Ray node address
    (127.0.0.1 for a local Ray), never to every interface as torch's default store is."""
    from dataclasses import dataclass

    import ray
    from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

    class _NodeBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            n = len(worker_group)
            backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0)
                                                 else "gloo")
            addr, port = worker_group.execute_single(0, _node_store, n, backend_config.timeout_s)
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, _join_process_group, backend, i, n, addr, port,
                                                       backend_config.timeout_s) for i in range(n)])

    @dataclass
    class NodeTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _NodeBackend

    return NodeTorchConfig()


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
    claim_output(out, stage)
    if not exists(join(out, MANIFEST)):
        return False
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


def lost_to_the_cluster(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps) says the cluster lost an actor, a worker, a node or an object
    (a node killed or preempted under a running job) rather than that the work itself failed: an actor
    whose constructor raised is not lost, it would fail again."""
    import ray.exceptions as rex
    lost = (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, rex.RayActorError):
            return not e.actor_init_failed
        if isinstance(e, lost):
            return True
        if isinstance(e, rex.UnserializableException):
            # Ray could not unpickle the original (an ActorDiedError carrying its protobuf context cannot be
            # pickled: a pool actor whose node died before it ran reaches the driver so): judge its text.
            text = getattr(e, "_original_stack_trace", "") or ""
            names = re.findall(r"ray\.exceptions\.(\w+)", text)
            classes = [c for c in (getattr(rex, n, None) for n in names) if isinstance(c, type)]
            if any(issubclass(c, rex.RayActorError) for c in classes):
                return "raised in its creation task" not in text
            return any(issubclass(c, lost) for c in classes)
        e = getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else (
            e.__cause__ or e.__context__)
    return False
