"""Faults during real runs: a killed embedding actor, a killed Ray Train worker, killed drivers.

Each scenario must end in what an undisturbed run gives: embeddings byte-identical to the same
projections computed in this process without Ray, every id exactly once; a prior of the same
quality. Processes are killed with SIGKILL (no cleanup handlers run), and only processes of the
Ray instances these tests started (found through their own GCS, or their private temp dir).
An interrupted sweep resuming only its missing cells is tested in test_sweep.py
(``test_resume_trains_only_missing_cells``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from _ray_helpers import (
    CLI,
    LOOPBACK,
    ONE_BLOCK_PER_SHARD,
    digests,
    kill_ray_processes,
    listen_addresses,
    prepare,
    private_ray_tmp,
    ray_processes,
    reference_embeddings,
    temp_leftovers,
    tiny_prior,
)
from conftest import SHARED_DATA

from raycluster import cli

pytestmark = pytest.mark.slow

N, SHARD = 384, 48                      # images per split, rows per shard: 16 shards
EMBED = ["--dim", "64,256", "--density", "auto,1", "--batch-size", "16"]
TRAIN = ["--epochs", "2", "--layers", "2", "--filters", "8", "--batch-size", "32", "--cpus-per-worker", "0.5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("faults")
    prepare(mnist_dir, root / "data", N, SHARD)
    tiny_prior(root / "prior", layers=3, filters=16)
    reference_embeddings(root / "prior", root / "data", root / "ref", [64, 256], [None, 1.0])
    return root


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the in-process scenarios; the CLI joins it instead of starting its own."""
    import ray

    from raycluster.runtime import loopback_only
    saved = {k: os.environ.get(k) for k in ONE_BLOCK_PER_SHARD}
    os.environ.update(ONE_BLOCK_PER_SHARD)         # several blocks in flight, shards written one by one
    with private_ray_tmp():
        loopback_only()
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _embed_args(root, out):
    return ["embed", "--prior", str(root / "prior"), "--data", str(root / "data"), "--out", str(out), *EMBED]


def _actors(ray, class_part: str) -> list[dict]:
    """Live actors of this Ray instance whose class name contains ``class_part`` (from the GCS)."""
    return [a for a in ray._private.state.actors().values()
            if class_part in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"]]


class _Killer(threading.Thread):
    """Once ``ready()``, SIGKILL the process of one live actor whose class name contains
    ``class_part``; ``record`` gets its GCS entry. ``stop()`` ends the wait and returns ``record``."""

    def __init__(self, ready, ray, class_part: str):
        super().__init__(daemon=True)
        self.ready, self.ray, self.class_part, self.record = ready, ray, class_part, {}
        self.halt = threading.Event()
        self.start()

    def run(self):
        while not self.halt.is_set() and not self.ready():
            time.sleep(0.05)
        while not self.halt.is_set():
            live = _actors(self.ray, self.class_part)
            if live:
                self.record.update(live[0], killed_at=time.time())
                os.kill(live[0]["Pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        return self.record


def _ids_once(out, data):
    """Every prepared id appears exactly once across the output shards."""
    import pyarrow.parquet as pq
    want = sorted(i for f in data.glob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist())
    got = sorted(i for f in out.glob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist())
    assert got == want and len(set(got)) == len(got)


# ----------------------------------------------------------------- a. an embedding actor dies

def test_embed_survives_a_killed_actor(inputs, local_ray, tmp_path):
    out, done = tmp_path / "emb", []

    def first_shard_written():
        done[:] = sorted(p.name for p in out.glob("*.parquet"))
        return bool(done)
    killer = _Killer(first_shard_written, local_ray, "_ScoreActor")
    assert cli.main([*_embed_args(inputs, out), "--actors", "2"]) == 0
    record = killer.stop()

    assert record, "no embedding actor was alive to kill"
    assert 0 < len(done) < 16                                         # killed mid-run
    assert local_ray._private.state.actors(record["ActorID"])["NumRestarts"] >= 1   # Ray Data restarted it
    _ids_once(out, inputs / "data")
    assert digests(out) == digests(inputs / "ref")                    # same bytes as undisturbed
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    print(f"\nembed, actor {record['Pid']} killed with {len(done)} of 16 shards written: "
          f"{timing['seconds']} s for {timing['images']} images")


def test_lost_to_the_cluster_tells_lost_actors_from_failed_work():
    import ray.exceptions as rex

    from raycluster.runtime import lost_to_the_cluster
    assert lost_to_the_cluster(rex.ActorDiedError())                           # a node died under it
    assert lost_to_the_cluster(rex.NodeDiedError("node"))
    try:                                                                       # wrapped, as Ray Data raises it
        try:
            raise rex.ActorDiedError()
        except Exception as e:
            raise RuntimeError("map_batches failed") from e
    except RuntimeError as wrapped:
        assert lost_to_the_cluster(wrapped)
    assert not lost_to_the_cluster(rex.RayActorError(actor_init_failed=True))  # its constructor raised
    assert not lost_to_the_cluster(ValueError("bad batch"))


def test_an_actor_lost_before_it_ran_is_lost_even_when_ray_cannot_unpickle_it():
    """A pool actor whose node died before it ran reaches the driver as an UnserializableException (its
    ActorDiedError holds a protobuf context that cannot be pickled; the autoscaling test met it): its text
    says what it was. A constructor that raised, or an error of the work itself, is still not lost."""
    import traceback

    import ray.exceptions as rex
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    from raycluster.runtime import lost_to_the_cluster

    def as_ray_delivers(err):
        try:
            rex.RayError.from_bytes(err.to_bytes())
        except TypeError:                                 # pickling fails first here: Ray keeps the text
            return rex.UnserializableException("".join(traceback.format_exception(err)))
        raise AssertionError("this Ray pickles the error now: the text fallback may be unneeded")

    ctx = ActorDiedErrorContext(class_name="_ScoreActor", actor_id=b"\x01" * 16, never_started=True,
                                error_message="The actor is dead because its node has died.")
    never_ran = as_ray_delivers(rex.ActorDiedError(ctx))
    assert "never ran" in str(never_ran) and lost_to_the_cluster(never_ran)
    try:
        raise RuntimeError("map_batches failed") from never_ran
    except RuntimeError as wrapped:
        assert lost_to_the_cluster(wrapped)
    init = rex.ActorDiedError(rex.RayTaskError("__init__", "Traceback ...", ValueError("bad prior")))
    assert not lost_to_the_cluster(rex.UnserializableException("".join(traceback.format_exception(init))))
    assert lost_to_the_cluster(rex.UnserializableException("ray.exceptions.NodeDiedError: node 3 died"))
    assert not lost_to_the_cluster(rex.UnserializableException("ValueError: bad batch"))


def test_embed_runs_the_pool_again_when_the_cluster_loses_an_actor(inputs, local_ray, tmp_path, monkeypatch, capsys):
    """A loss Ray Data does not recover from (an actor error that ends the pass): the pool runs again over the shards not written
    yet, and the embeddings are those of an undisturbed run. Failed work is not rerun."""
    import ray.exceptions as rex

    import raycluster.embed as embed
    real, calls = embed._embed_shards, []

    def lose_an_actor(args, todo, *rest):
        calls.append([s["file"] for s in todo])
        if len(calls) == 1:                        # half the shards written, then the actor is gone
            real(args, todo[:len(todo) // 2], *rest)
            raise rex.ActorDiedError()
        return real(args, todo, *rest)
    monkeypatch.setattr(embed, "_embed_shards", lose_an_actor)
    out = tmp_path / "emb"
    assert cli.main(_embed_args(inputs, out)) == 0
    assert len(calls) == 2 and len(calls[1]) == len(calls[0]) - len(calls[0]) // 2
    assert set(calls[1]).isdisjoint(calls[0][:len(calls[0]) // 2])
    assert "the cluster lost an actor" in capsys.readouterr().out
    _ids_once(out, inputs / "data")
    assert digests(out) == digests(inputs / "ref")
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    assert timing["passes"] == 2 and timing["images"] == 2 * N

    def fail_in_constructor(args, todo, *rest):
        calls.append(todo)
        raise rex.RayActorError(actor_init_failed=True)
    calls.clear()
    monkeypatch.setattr(embed, "_embed_shards", fail_in_constructor)
    assert cli.main(_embed_args(inputs, tmp_path / "never")) == 2
    assert len(calls) == 1


def test_embed_replaces_a_pool_actor_that_dies_before_it_runs(inputs, local_ray, tmp_path, monkeypatch, capsys):
    """An actor that dies in its constructor (as one pending on a node that is killed does: "the actor never
    ran") is replaced by Ray Data within the pass, up to ``ACTOR_INIT_DEATHS`` in a row; one that always
    dies fails the command in one line."""
    import raycluster.embed as embed
    marker = tmp_path / "deaths"

    class DiesFirst(embed._ScoreActor):
        def __init__(self, *a, **kw):
            with open(marker, "a") as f:
                f.write("x")
            if marker.stat().st_size <= limit:
                raise RuntimeError("lost before it ran")
            super().__init__(*a, **kw)
    monkeypatch.setattr(embed, "_ScoreActor", DiesFirst)
    limit = embed.ACTOR_INIT_DEATHS
    out = tmp_path / "emb"
    assert cli.main(_embed_args(inputs, out)) == 0
    assert marker.stat().st_size == limit + 1
    assert json.loads((out / "manifest.json").read_text())["timing"]["passes"] == 1
    assert digests(out) == digests(inputs / "ref")

    marker.unlink()
    limit = 10 ** 6
    capsys.readouterr()
    assert cli.main(_embed_args(inputs, tmp_path / "never")) == 2
    assert marker.stat().st_size == embed.ACTOR_INIT_DEATHS + 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]   # after the progress bar
    assert len(errors) == 1 and "embedding failed" in errors[0] and "lost before it ran" in errors[0], errors


# ----------------------------------------------------------------- b. a Ray Train worker dies

def _train(root, out, *extra):
    return cli.main(["train-prior", "--data", str(root / "data"), "--out", str(out), *TRAIN, *extra])


def _stray_checkpoint(experiment, epochs: int) -> bytes:
    """A complete-looking checkpoint directory (random weights, "all epochs done") written into the
    run's storage without being reported to Ray Train: the state a worker leaves when it dies after
    uploading a checkpoint but before the controller registered it. Returns its weights."""
    import torch

    from fisher.models import WEIGHTS, PixelCNN, PixelCNNConfig
    from fisher.training import state_bytes
    stray = experiment / "checkpoint_2099-12-31_23-59-59.999999"      # newest name there is
    stray.mkdir(parents=True)
    torch.manual_seed(123)
    model = PixelCNN(PixelCNNConfig(n_layers=2, filters=8))
    files = state_bytes(model, torch.optim.Adam(model.parameters()), epochs)
    for name, data in {**files, "metrics.json": json.dumps({"epoch": epochs}).encode()}.items():
        (stray / name).write_bytes(data)
    return files[WEIGHTS]


def test_train_prior_survives_a_killed_worker(inputs, local_ray, tmp_path):
    from fisher.models import WEIGHTS
    base, out = tmp_path / "base", tmp_path / "killed"
    assert _train(inputs, base, "--max-failures", "0") == 0
    experiment = out / "ray" / "prior"
    from fisher.io import claim_output
    claim_output(str(out), "train-prior")       # an earlier train-prior into this --out left the stray below
    stray_weights = _stray_checkpoint(experiment, epochs=2)
    snapshot = experiment / "checkpoint_manager_snapshot.json"        # written once epoch 1 is registered
    killer = _Killer(snapshot.exists, local_ray, "RayTrainWorker")
    assert _train(inputs, out, "--max-failures", "1") == 0
    record = killer.stop()

    assert record, "no Ray Train worker was alive to kill"
    m = json.loads((out / "manifest.json").read_text())
    b = json.loads((base / "manifest.json").read_text())
    # the replacement worker resumed from the checkpoint registered after epoch 1: not from scratch,
    # and not from the stray "all epochs done" directory, which Train never registered
    assert [(h["epoch"], h["resumed_after_epoch"]) for h in m["history"]] == [(1, 0), (2, 1)]
    assert [(h["epoch"], h["resumed_after_epoch"]) for h in b["history"]] == [(1, 0), (2, 0)]
    assert (out / WEIGHTS).read_bytes() != stray_weights
    assert (experiment / "checkpoint_2099-12-31_23-59-59.999999").is_dir()   # ignored, left as it was
    # same quality; not bitwise: Ray Data's block order (and so the batches) varies from run to run
    assert m["metrics"]["test_nll_nats"] == pytest.approx(b["metrics"]["test_nll_nats"], rel=0.01)
    print(f"\ntrain-prior, worker killed: NLL {m['metrics']['test_nll_nats']:.4f} vs undisturbed "
          f"{b['metrics']['test_nll_nats']:.4f}; weights identical: "
          f"{(out / WEIGHTS).read_bytes() == (base / WEIGHTS).read_bytes()}; history "
          f"{[(h.get('epoch'), h.get('resumed_after_epoch')) for h in m['history']]}")


@pytest.fixture(scope="module")
def embeddings(inputs, local_ray):
    """64-dim Fisher embeddings of the module's data, for the decoders."""
    out = inputs / "emb64"
    assert cli.main(["embed", "--prior", str(inputs / "prior"), "--data", str(inputs / "data"), "--out", str(out),
                     "--dim", "64", "--batch-size", "16"]) == 0
    return out


@pytest.mark.parametrize("decoder, options", [
    ("realnvp", ["--features", "8", "--blocks", "1"]),                  # a flow: likelihood, sampled decoding
    ("wgan", ["--width", "8", "--noise-dim", "8", "--n-critic", "2"]),   # adversarial: its own step and counter
    ("pixelcnn", ["--layers", "2", "--filters", "6", "--kernel", "3"]),  # autoregressive: likelihood, cached sampler
])
def test_train_decoder_survives_a_killed_worker(inputs, embeddings, local_ray, tmp_path, decoder, options):
    """A generative decoder's Ray Train worker killed after epoch 1 is registered: the replacement resumes
    from that checkpoint (weights, optimizer, the WGAN's critic-step counter) and ends where an undisturbed
    run does."""
    import torch
    args = lambda out, *extra: ["train-decoder", "--embeddings", str(embeddings), "--data",  # noqa: E731
                                str(inputs / "data"), "--out", str(out), "--decoder", decoder, *options,
                                "--epochs", "2", "--batch-size", "64", "--cpus-per-worker", "0.5", *extra]
    base, out = tmp_path / "base", tmp_path / "killed"
    assert cli.main(args(base, "--max-failures", "0")) == 0
    killer = _Killer((out / "ray" / "decoder" / "checkpoint_manager_snapshot.json").exists, local_ray,
                     "RayTrainWorker")
    assert cli.main(args(out, "--max-failures", "1")) == 0
    assert killer.stop(), "no Ray Train worker was alive to kill"
    m = json.loads((out / "manifest.json").read_text())
    b = json.loads((base / "manifest.json").read_text())
    assert [(h["epoch"], h["resumed_after_epoch"]) for h in m["history"]] == [(1, 0), (2, 1)]
    assert [(h["epoch"], h["resumed_after_epoch"]) for h in b["history"]] == [(1, 0), (2, 0)]
    if decoder == "wgan":           # no likelihood: the critic-step counter shows the whole run was trained
        weights = torch.load(out / "weights.pt", weights_only=True)
        assert int(weights["critic_steps"]) == 2 * -(-N // 64) and m["metrics"]["test_mse"] > 0
    elif decoder == "realnvp":      # same quality; not bitwise: the flow draws its dequantization noise
        assert m["metrics"]["test_bce_nats_per_pixel"] == pytest.approx(b["metrics"]["test_bce_nats_per_pixel"],
                                                                        rel=0.05)
    else:                           # no noise in training: the resumed run ends where the undisturbed one does
        assert m["metrics"]["test_bce_nats_per_pixel"] == pytest.approx(b["metrics"]["test_bce_nats_per_pixel"],
                                                                        rel=1e-5)
    print(f"\ntrain-decoder {decoder}, worker killed: {m['metrics']} vs undisturbed {b['metrics']}")


# ----------------------------------------------------------------- c. the driver dies

def _start_and_kill(cmd, out, log, ready, timeout=600) -> list[str]:
    """Run ``cmd``; SIGKILL it as soon as ``ready()``; returns the finished shards then present."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ONE_BLOCK_PER_SHARD})
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before it could be killed: {log.read_text()[-2000:]}"
    return sorted(digests(out))


def test_embed_driver_killed_then_rerun(inputs, tmp_path):
    out = tmp_path / "emb"
    cmd = [*CLI, *_embed_args(inputs, out), "--actors", "1", "--num-cpus", "2"]
    with private_ray_tmp("fk") as ray_tmp:                # the killed driver starts its own local Ray here
        env_before = os.environ.pop("RAY_ADDRESS", None)
        listening = set()

        def first_shard():                                # and where the driver's own Ray listens
            listening.update(listen_addresses(ray_tmp))
            return any(out.glob("*.parquet"))
        try:
            done = _start_and_kill(cmd, out, tmp_path / "killed.log", first_shard)
            # the local Ray that the driver started goes down with it (Ray's fate sharing)
            killed, deadline = time.time(), time.time() + 30
            while ray_processes(ray_tmp) and time.time() < deadline:
                time.sleep(0.5)
            gone_after = time.time() - killed
            orphans = [" ".join(p.cmdline()[:2]) for p in ray_processes(ray_tmp)]
            kill_ray_processes(ray_tmp)
            rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                   env={**os.environ, **ONE_BLOCK_PER_SHARD})
        finally:
            if env_before is not None:
                os.environ["RAY_ADDRESS"] = env_before
    assert listening and listening <= LOOPBACK, listening        # the local Ray `fisher` starts is loopback-only
    assert not orphans, f"Ray processes outlived the killed driver: {orphans}"
    assert 0 < len(done) < 16
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"embed: {len(done)} of 16 shards already done" in rerun.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["images"] == (16 - len(done)) * SHARD   # only the missing shards recomputed
    _ids_once(out, inputs / "data")
    assert digests(out) == digests(inputs / "ref")
    assert not temp_leftovers(out)
    print(f"\nembed driver killed with {len(done)} of 16 shards written; its Ray was gone "
          f"{gone_after:.1f} s later; the rerun took {manifest['timing']['seconds']} s for the rest")


def test_prepare_driver_killed_then_rerun(mnist_dir, tmp_path):
    real = mnist_dir == SHARED_DATA / "mnist"
    options = ["--limit", "20000", "--shard-size", "100"] if real else ["--shard-size", "4"]   # 300 / 175 shards
    out, base = tmp_path / "killed", tmp_path / "base"
    args = ["prepare", "mnist", "--src", str(mnist_dir), *options]
    done = _start_and_kill([*CLI, *args, "--out", str(out)], out, tmp_path / "killed.log",
                           lambda: any(out.glob("*.parquet")))
    assert done and not (out / "manifest.json").exists()
    leftovers = temp_leftovers(out)
    finished = {name: (out / name).stat().st_mtime_ns for name in done}
    rerun = subprocess.run([*CLI, *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "prepared mnist" in rerun.stdout and "already prepared" not in rerun.stdout   # not a finished artifact
    assert f"prepare: {len(done)} of " in rerun.stdout                                 # ... but finished shards
    assert all((out / name).stat().st_mtime_ns == t for name, t in finished.items())  # are kept, not rewritten
    assert cli.main([*args, "--out", str(base)]) == 0
    assert digests(out) == digests(base)
    assert not temp_leftovers(out)
    m, mb = (json.loads((d / "manifest.json").read_text()) for d in (out, base))
    assert m["shards"] == mb["shards"] and m["counts"] == mb["counts"]
    assert sorted(s["file"] for s in m["shards"]) == sorted(digests(out))
    print(f"\nprepare killed with {len(done)} of {len(m['shards'])} shards written "
          f"({len(leftovers)} temporary files); the rerun kept them and wrote the rest, same bytes")
