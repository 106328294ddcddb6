"""``cluster.yaml``'s node types driven by Ray's own autoscaler on this machine (loopback only).

The cluster is what ``ray.cluster_utils.AutoscalingCluster`` builds: a head started with
``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` whose autoscaler (v1, the one
``ray up cluster.yaml`` runs in Ray 2.60) launches "nodes" through Ray's fake multi-node provider:
each is a real raylet (with its object store, agents and workers) on 127.0.0.1. The class itself is
not used: its ``start``/``shutdown`` run ``ray stop --force``, which would stop every Ray on the
machine, and it reads ``fake_multi_node/example.yaml``, which Ray 2.60's wheel does not ship (that
missing file also stops autoscaler v2's fake provider from starting, so v2 is not tried here).
This test writes the same config itself, with its own ports and temp dir, and stops only the
processes started under that dir.

What comes from ``cluster.yaml`` (unchanged): the worker node types (``available_node_types`` other
than the head) with their ``resources``, ``min_workers``, ``max_workers``, the global
``max_workers`` and ``upscaling_speed``, and the head's resources (``CPU: 0``: the head runs no
tasks, so every actor and read task needs a worker). ``idle_timeout_minutes`` (10) is scaled
by 1/60 to 10 s. Test-only additions: a 100 MiB object store per node (a raylet would take 30 %
of the machine's memory) and a 10 s heartbeat timeout (Ray's default 30 s) after which the
autoscaler terminates a node that stopped reporting.

GPUs: the worker types keep ``GPU: 1`` as Ray's logical GPU resource (Ray does not check that a
declared GPU exists), so the node types are exactly cluster.yaml's, and requests are checked
against them; but the jobs' actors are CPU actors (no ``--gpu``): this machine has no CUDA, and
``--gpu`` actors would run torch on ``cuda``. To need workers the way GPU actors do, each embed
actor asks for 5 CPUs: more than the head (0) and more than half a worker (8), so two actors need
two workers.

One run from zero workers: two impossible requests are refused in one line naming the option
and the largest node type (and nothing is launched); ``fisher sweep --address`` over two cells
(5 CPUs per trial: a worker each) scales up from zero, its embeddings are byte-identical to a
one-process run and each cell's decoder metrics equal ``fit_decoder`` run in this process on the
same column; the workers go away after the idle timeout; a ``fisher embed`` (two 5-CPU actors)
scales 0 -> 2 workers of cluster.yaml's GPU types, one of its workers is SIGKILLed mid-job (the
node is gone, as after a spot pre-emption without notice), the job still finishes with shards
byte-identical to a one-process run, and the cluster goes back to zero workers. The nodes-over-time
timeline is printed (``pytest -s``) and quoted in the README.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _ray_helpers import (
    CLI,
    LOOPBACK,
    ONE_BLOCK_PER_SHARD,
    digests,
    kill_ray_processes,
    listen_addresses,
    prepare,
    ray_processes,
    reference_embeddings,
    tiny_prior,
)

from raycluster import cli

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
RAY = shutil.which("ray", path=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
IDLE_SCALE = 1 / 60                     # cluster.yaml's idle timeout, minutes -> seconds
FAKE_HEAD = "ray.head.default"          # the head's node type name in Ray's fake provider
DIMS, DENSITIES = [16, 32], [None, 1.0]
EMBED = ["--dim", "16,32", "--density", "auto,1", "--actors", "2", "--cpus-per-actor", "5", "--batch-size", "8"]
GRID = {"dim": [16], "density": [0.25, 1.0]}             # two sweep cells
SWEEP = ["--epochs", "1", "--batch-size", "16", "--cpus-per-trial", "5"]

needs_ray_cli = pytest.mark.skipif(RAY is None, reason="the `ray` command line is not installed "
                                                    "(pip install 'ray[default]')")


def fake_cluster_config(cluster_yaml: dict, gcs: str) -> dict:
    """cluster.yaml's node types for Ray's fake multi-node provider (what AutoscalingCluster writes)."""
    head = cluster_yaml["head_node_type"]
    types = {name: {"resources": {**t["resources"], "object_store_memory": 100 * 2**20}, "node_config": {},
                    "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
             for name, t in cluster_yaml["available_node_types"].items() if name != head}
    types[FAKE_HEAD] = {"resources": cluster_yaml["available_node_types"][head]["resources"], "node_config": {},
                        "max_workers": 0}
    return {"cluster_name": "fisher-fake", "max_workers": cluster_yaml["max_workers"],
            "upscaling_speed": cluster_yaml["upscaling_speed"],
            "idle_timeout_minutes": cluster_yaml["idle_timeout_minutes"] * IDLE_SCALE,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs},
            "available_node_types": types, "head_node_type": FAKE_HEAD, "auth": {}, "docker": {},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def autoscaling_cluster(monkeypatch, cluster_yaml: dict):
    """Start the head (no workers); yield (GCS address, env for subprocesses, temp dir); stop what ran under it."""
    from ray._private import ray_constants
    temp = tempfile.mkdtemp(prefix="fa", dir="/tmp")          # short: unix socket paths live under it
    gcs, dash, client, agent, metrics = (f"127.0.0.1:{_free_port()}", *(str(_free_port()) for _ in range(4)))
    config = os.path.join(temp, "autoscaling.yaml")
    Path(config).write_text(yaml.safe_dump(fake_cluster_config(cluster_yaml, gcs)))
    common = {"RAY_TMPDIR": temp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN": secrets.token_hex(32),
              "RAY_raylet_start_wait_time_s": "180"}          # a loaded machine starts raylets slowly
    for k, v in common.items():
        monkeypatch.setenv(k, v)
    from ray._private.authentication_test_utils import reset_auth_token_state
    reset_auth_token_state()                                  # Ray caches the token it read first
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")]), "PYTHONPATH": str(ROOT),
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}
    try:
        r = subprocess.run([RAY, "start", "--head", "--autoscaling-config", config, "--port", gcs.split(":")[1],
                            "--node-ip-address", "127.0.0.1", "--num-cpus", "0",
                            "--object-store-memory", str(200 * 2**20), "--include-dashboard", "false",
                            "--dashboard-port", dash, "--ray-client-server-port", client,
                            "--dashboard-agent-listen-port", agent, "--metrics-export-port", metrics,
                            "--temp-dir", temp, "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        yield gcs, {**env, **ONE_BLOCK_PER_SHARD, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}, temp
    finally:
        import ray
        ray.shutdown()
        kill_ray_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
        reset_auth_token_state()


class Timeline:
    """Alive worker nodes over time, sampled from the GCS; node types from the autoscaler's report."""

    def __init__(self):
        self.t0, self.samples, self.types, self.resources = time.time(), [], {}, {}

    def sample(self) -> list[str]:
        import ray
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get
        alive = sorted(n["NodeID"] for n in ray.nodes()
                       if n["Alive"] and "node:__internal_head__" not in n["Resources"])
        for n in ray.nodes():
            self.resources.setdefault(n["NodeID"], {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")})
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or "{}")
        self.report = status.get("autoscaler_report") or {}
        self.requests = (status.get("load_metrics_report") or {}).get("request_demand")
        self.types.update(self.report.get("node_type_mapping") or {})
        now = round(time.time() - self.t0, 1)
        if not self.samples or self.samples[-1][1] != len(alive):
            self.samples.append((now, len(alive)))
        self.last = (now, alive)
        return alive

    def at_zero(self, alive) -> bool:
        """No worker alive, none active, pending or being launched in the autoscaler's own report."""
        r = self.report
        return (not alive and set(r.get("active_nodes") or {}) <= {FAKE_HEAD} and not r.get("pending_nodes")
                and not r.get("pending_launches"))

    def wait(self, predicate, timeout: float, what: str) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self.sample()):
                return self.last[0]
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; timeline {self.samples}; "
                             f"autoscaler report {self.report}; resource requests {self.requests}")


def _run_job(argv: list[str], env: dict, timeline: Timeline, on_sample=None, timeout: float = 300):
    """Run a `fisher` command as a subprocess while sampling the nodes; returns (rc, output, start, end)."""
    log = tempfile.TemporaryFile("w+")
    timeline.sample()
    start = timeline.last[0]
    p = subprocess.Popen(CLI + argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while p.poll() is None and time.time() < deadline:
            alive = timeline.sample()
            if on_sample:
                on_sample(alive)
            time.sleep(0.5)
    finally:
        if p.poll() is None:
            p.kill()
    p.wait()
    timeline.sample()
    log.seek(0)
    return p.returncode, log.read(), start, timeline.last[0]


def _kill_node(node_id: str, marker: str) -> int:
    """SIGKILL one fake node: its raylet (``--node_id``) and everything the raylet started (its agents
    and workers, whose command lines Ray rewrites to ``ray::...``)."""
    import psutil
    procs = []
    for p in ray_processes(marker):
        with contextlib.suppress(psutil.Error):
            if f"--node_id={node_id}" in p.cmdline():
                procs += [p, *p.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(procs)


def _autoscaler_events(temp: str) -> list[str]:
    """The autoscaler's launch / removal events (its monitor log), as 'HH:MM:SS event'."""
    out = []
    for log in sorted(Path(temp).glob("session_2*/logs/monitor.log")):          # not session_latest, a link
        for line in log.read_text(errors="replace").splitlines():
            if ":event_summary:" in line and ("Adding" in line or "Removing" in line):
                out.append(f"{line.split()[1].split(',')[0]} {line.split(':event_summary:', 1)[1]}")
    return out


def _assert_cells_match_one_process(out: Path, data: Path, threads: int) -> None:
    """Each sweep cell's test metrics equal ``fit_decoder`` on the same column in this process, with the
    cell's decoder config and the trial's torch thread count."""
    import torch

    from fisher.decoders import DecoderTrainConfig, fit_decoder, load_split_tensors
    from fisher.io import read_manifest
    records = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    columns = read_manifest(str(out / "embeddings"), "embed")["columns"]
    assert sorted(records) == sorted(columns) and len(records) == len(GRID["dim"]) * len(GRID["density"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for column, rec in records.items():
            cfg = DecoderTrainConfig.from_dict(rec["decoder"])
            t = load_split_tensors(str(out / "embeddings"), str(data), column)
            _, metrics = fit_decoder(cfg, *t["train"], *t["test"], 2, [28, 28, 1])
            for key in ("test_bce_nats_per_pixel", "test_mse"):
                assert rec[key] == pytest.approx(metrics[key], rel=1e-6), (column, key, rec[key], metrics[key])
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@needs_ray_cli
def test_autoscaler_scales_cluster_yaml_node_types_for_embed(tmp_path, mnist_dir, monkeypatch, capsys):
    import ray
    started = time.time()
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = cfg["head_node_type"]
    worker_types = {n: t for n, t in cfg["available_node_types"].items() if n != head}
    idle_s = cfg["idle_timeout_minutes"] * 60 * IDLE_SCALE
    data = prepare(mnist_dir, tmp_path / "data", limit=64, shard_size=16)          # 8 shards: 4 train, 4 test
    prior = tiny_prior(tmp_path / "prior")
    ref = reference_embeddings(prior, data, tmp_path / "ref", DIMS, DENSITIES)
    sweep_ref = reference_embeddings(prior, data, tmp_path / "sweep-ref", GRID["dim"], GRID["density"])
    (tmp_path / "grid.json").write_text(json.dumps(GRID))
    job = ["embed", "--prior", str(prior), "--data", str(data), *EMBED]
    sweep = ["sweep", "--prior", str(prior), "--data", str(data), "--grid", str(tmp_path / "grid.json"), *SWEEP]

    with autoscaling_cluster(monkeypatch, cfg) as (gcs, env, temp):
        for attempt in range(3):                                   # the GCS may be slow to answer on a loaded machine
            try:
                ray.init(address=gcs, configure_logging=False, log_to_driver=False)
                break
            except ConnectionError:
                if attempt == 2:
                    raise
                time.sleep(5)
        tl = Timeline()
        assert tl.sample() == []                                   # zero workers at start

        # requests no node type can hold: refused at once, in one line, and nothing is launched
        capsys.readouterr()
        assert cli.main(job + ["--out", str(tmp_path / "never"), "--address", gcs, "--cpus-per-actor", "12"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--cpus-per-actor 12: asks CPU 12 per actor" in err, err
        assert "largest node type: gpu_ondemand with CPU 8" in err and "autoscaling.yaml" in err, err
        assert not list((tmp_path / "never").glob("*.parquet"))
        assert cli.main(["sweep", "--prior", str(prior), "--data", str(data), "--out", str(tmp_path / "never-sweep"),
                         "--address", gcs, "--gpus-per-trial", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--gpus-per-trial 2: asks GPU 2 per trial" in err, err
        assert "largest node type: gpu_ondemand with CPU 8, GPU 1" in err, err
        time.sleep(3)
        assert tl.sample() == [], "an impossible request launched a worker"

        # 1. scale up from zero for a sweep; its embeddings and cells equal a one-process run
        rc, out, t_submit, t_done = _run_job(sweep + ["--out", str(tmp_path / "sweep"), "--address", gcs], env, tl)
        assert rc == 0, out[-4000:]
        first_worker = next(t for t, n in tl.samples if n > 0) - t_submit
        peak1 = max(n for t, n in tl.samples)
        print(f"\njob 1 (sweep): submitted {t_submit}, done {t_done}; timeline {tl.samples}")
        listening = listen_addresses(temp)
        t_zero = tl.wait(tl.at_zero, 60 + 3 * idle_s, "scale-down to zero workers")
        assert digests(tmp_path / "sweep" / "embeddings") == digests(sweep_ref)
        _assert_cells_match_one_process(tmp_path / "sweep", data, threads=5)

        # 2. again from zero; one worker is killed mid-job, as soon as one of the pool's actors is alive on it
        killed = []

        shards = len(json.loads((data / "manifest.json").read_text())["shards"])

        def kill_one(alive):
            done = len(list((tmp_path / "emb2").glob("*.parquet")))
            if killed or not alive:
                return
            assert done < shards, "the job finished before a worker could be killed"
            pool = sorted({a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                           if a["State"] == "ALIVE" and "_ScoreActor" in a["ActorClassName"]} & set(alive))
            if pool:                                        # a worker that runs one of the job's embedding actors
                killed.append((pool[-1], tl.last[0], done, _kill_node(pool[-1], temp)))

        # one image per batch: 64 batches keep the pool busy for a few samples once its actors are up (with
        # batches of 8 the 8 shards could all finish between two samples); the embeddings do not depend on it
        rc, out, t_submit2, t_done2 = _run_job(job + ["--out", str(tmp_path / "emb2"), "--address", gcs,
                                                      "--batch-size", "1"], env, tl, on_sample=kill_one)
        print(f"job 2 (embed): submitted {t_submit2}, done {t_done2}, kill {killed}; timeline {tl.samples}")
        assert rc == 0, out[-4000:]
        assert killed and killed[0][3] >= 3, killed                # raylet, agents, workers
        assert digests(tmp_path / "emb2") == digests(ref)
        used = set(json.loads((tmp_path / "emb2" / "manifest.json").read_text())["timing"]["nodes"])
        assert len(used) >= 2, used                                # two 5-CPU actors: two workers (or a replacement)
        listening |= listen_addresses(temp)
        tl.wait(lambda alive: killed[0][0] not in alive, 60, "the GCS to declare the killed node dead")
        t_zero2 = tl.wait(tl.at_zero, 120 + 3 * idle_s, "scale-down to zero workers after the kill")
        types, resources = dict(tl.types), dict(tl.resources)
        events = _autoscaler_events(temp)

    print("\n".join(["autoscaler events:", *events]))
    removed = [e for e in events if "Removing" in e]
    assert removed and all(e.endswith("(idle).") for e in removed), events      # removed by the idle timeout only

    workers = {n: t for n, t in types.items() if t != "ray.head.default"}
    assert workers and set(workers.values()) <= set(worker_types)                # cluster.yaml's GPU worker types
    for name, t in worker_types.items():
        launched = [n for n, tt in workers.items() if tt == name]
        assert all(resources.get(n) == {**t["resources"]} for n in launched if n in resources), resources
    limit = min(cfg["max_workers"], sum(t["max_workers"] for t in worker_types.values()))
    assert max(n for _, n in tl.samples) <= limit
    assert used <= set(workers)
    assert listening and listening <= LOOPBACK, listening
    seconds = time.time() - started
    print(f"\nautoscaling timeline (s since {time.strftime('%H:%M:%S', time.localtime(tl.t0))}, when the head was up; "
          f"alive workers): {tl.samples}\n"
          f"job 1 (sweep, 2 cells): submitted {t_submit}, first worker after {first_worker:.1f} s, peak {peak1} "
          f"workers, done {t_done}, "
          f"zero workers at {t_zero} ({t_zero - t_done:.1f} s after the job, idle timeout {idle_s:g} s)\n"
          f"job 2 (embed): submitted {t_submit2}, killed {killed[0][0][-5:]} at {killed[0][1]} ({killed[0][2]} shards done), "
          f"done {t_done2}, zero workers at {t_zero2}; worker types {sorted(set(workers.values()))}, "
          f"{len(workers)} launched in all; resource requests left at the end: {tl.requests}; test {seconds:.0f} s")


@pytest.mark.parametrize("request_, refused", [
    ({"CPU": 8, "GPU": 1}, None),                                           # fits gpu_ondemand exactly
    ({"CPU": 12, "GPU": 0}, None),                                          # fits big_cpu
    ({"CPU": 20, "GPU": 0}, "--cpus-per-actor 20: asks CPU 20 per actor"),
    ({"CPU": 0.5, "GPU": 2}, "--gpu: asks GPU 2 per actor"),
    ({"CPU": 9, "GPU": 1}, "--cpus-per-actor 9: asks CPU 9 per actor"),    # CPU fits the head type only without GPU
])
def test_check_fits_names_the_option_and_the_largest_node_type(monkeypatch, capsys, request_, refused):
    """The refusal logic against cluster.yaml's node types (as the autoscaler's config would give them)."""
    from argparse import Namespace

    from fisher.io import FisherError
    from raycluster import runtime
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {n: t["resources"] for n, t in cfg["available_node_types"].items()}
    types["big_cpu"] = {"CPU": 16}
    monkeypatch.setattr(runtime, "node_types", lambda local: (types, "cluster.yaml"))
    args = Namespace(address="auto")
    options = {"CPU": f"--cpus-per-actor {request_['CPU']:g}", "GPU": "--gpu"}
    if refused is None:
        runtime.check_fits(args, request_, options)
        return
    with pytest.raises(FisherError) as e:
        runtime.check_fits(args, request_, options)
    assert str(e.value).startswith(refused) and "\n" not in str(e.value), e.value
    largest = "big_cpu with CPU 16" if request_["GPU"] == 0 else "gpu_ondemand with CPU 8, GPU 1"
    assert f"largest node type: {largest}" in str(e.value), e.value

    monkeypatch.setattr(runtime, "node_types", lambda local: None)     # types unknown: a note, no refusal
    runtime.check_fits(args, request_, options)
    assert "not checking actor resources" in capsys.readouterr().out
