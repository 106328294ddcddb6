"""``ray job submit`` of a fisher job to a two-node Ray cluster on loopback.

The head is started as a user starts one, ``ray start --head``; token authentication is on, with a
token of this test (``RAY_AUTH_TOKEN``, not the user's ``~/.ray/auth_token``), and every port is
chosen free. Everything stays on 127.0.0.1: Ray turns ``--node-ip-address 127.0.0.1`` into the
machine's own IP and listens on every interface unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
and with that setting ``ray start --address`` refuses to add a node, so the second node is
started with the call ``ray start`` makes (``ray._private.node.Node``), as ``ray.cluster_utils``
does. Sessions live in a private temp dir (``--temp-dir``); at the end only the processes started
from that directory are stopped: ``ray stop`` would stop every Ray on the machine.

The job is prepare → embed with ``--address auto`` (with a small untrained prior made here; Ray
Train is tested elsewhere); each embed actor asks for 2 of a node's 3 CPUs, so the two actors run on both nodes and leave a CPU on each for Ray Data's reads.
The job's runtime env makes every shard its own block and has the pool wait for both actors, so
that the tiny job is not done by one actor in one task.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _ray_helpers import CLI, LOOPBACK, ONE_BLOCK_PER_SHARD, kill_ray_processes, listen_addresses, tiny_prior

BIN = str(Path(sys.executable).parent)
RAY = shutil.which("ray", path=os.pathsep.join([BIN, os.environ.get("PATH", "")]))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(RAY is None, reason="the `ray` command line is not installed "
                                                     "(pip install 'ray[default]')")]


ADD_NODE = """
import sys
from ray._private.node import Node
from ray._private.parameter import RayParams
gcs, temp, agent, metrics = sys.argv[1:]
Node(RayParams(gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=3, temp_dir=temp,
               dashboard_agent_listen_port=int(agent), metrics_export_port=int(metrics)),
     head=False, shutdown_at_exit=False, spawn_reaper=False)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _job(env: dict, command: str, api: str, sid: str) -> str:
    r = subprocess.run([RAY, "job", command, "--address", api, sid], env=env, capture_output=True, text=True,
                       timeout=120)
    return r.stdout + r.stderr


def _dashboard(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_job_submit_to_two_node_cluster(tmp_path, mnist_dir):
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="fj", dir="/tmp")      # short: unix socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": temp,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",       # keep 127.0.0.1 addresses on loopback
           "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent_head, agent_node, metrics_head, metrics_node = _free_ports(7)
    head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "3",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent_head), "--metrics-export-port", str(metrics_head),
            "--temp-dir", temp, "--disable-usage-stats"]
    node = [sys.executable, "-c", ADD_NODE, f"127.0.0.1:{gcs}", temp, str(agent_node), str(metrics_node)]
    data, prior, emb = tmp_path / "data", tiny_prior(tmp_path / "prior", layers=1, filters=4), tmp_path / "emb"
    fisher = shlex.join(CLI)
    script = " && ".join([
        f"{fisher} prepare mnist --src {shlex.quote(str(mnist_dir))} --out {data} --limit 64 --shard-size 16",
        f"{fisher} embed --prior {prior} --data {data} --out {emb} --dim 16 --actors 2 --cpus-per-actor 2 "
        "--batch-size 8 --address auto"])
    api = f"http://127.0.0.1:{dash}"
    try:
        for cmd in (head, node):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        # token auth is on: the dashboard (job API) refuses requests without or with a wrong token
        assert _dashboard(f"{api}/api/jobs/", None) == 401
        assert _dashboard(f"{api}/api/jobs/", "0" * 64) == 403
        assert _dashboard(f"{api}/api/jobs/", token) == 200

        sid = f"fisher-test-{secrets.token_hex(4)}"
        started = time.time()
        runtime_env = {"env_vars": {**ONE_BLOCK_PER_SHARD, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}}
        r = subprocess.run([RAY, "job", "submit", "--no-wait", "--address", api, "--submission-id", sid,
                            "--runtime-env-json", json.dumps(runtime_env), "--", "bash", "-c", script],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        status = ""                                       # "Job '<id>' succeeded" when it has
        while time.time() < started + 480 and not any(s in status for s in ("succeeded", "failed", "stopped")):
            time.sleep(5)
            status = _job(env, "status", api, sid).lower()
        seconds = time.time() - started
        logs = _job(env, "logs", api, sid)
        assert f"job '{sid}' succeeded" in status, f"{status}\n{logs[-6000:]}"
        req = urllib.request.Request(f"{api}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:        # Ray's state API
            nodes = json.load(resp)["data"]["result"]["result"]
        cluster_nodes = {n["node_id"] for n in nodes if n["state"] == "ALIVE"}
        listening = listen_addresses(temp)
    finally:
        kill_ray_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)

    assert len(cluster_nodes) == 2
    assert listening and listening <= LOOPBACK, listening        # nothing of the cluster on a public interface
    assert "prepared mnist" in logs and "embeddings written to" in logs
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 64, "test": 64} and len(manifest["shards"]) == 8
    assert set(manifest["timing"]["nodes"]) == cluster_nodes              # the job used both nodes
    print(f"\nray job submit: prepare + embed on 2 nodes in {seconds:.1f} s")
