"""Google Cloud Storage: prepare → embed → train-decoder, every ``--out``, ``--data`` and
``--embeddings`` a ``gs://`` URI.

A GCS emulator (gcp-storage-emulator) runs on 127.0.0.1 for the module, in a process of its own
(``_gcs_emulator.py``: it serves each connection on a thread, which pyarrow's checkpoint downloads
need). pyarrow (driver, Ray Data read tasks, Ray Train workers and their checkpoint uploads) finds it
through ``STORAGE_EMULATOR_HOST``, set before the module's local Ray starts so every Ray process
inherits it. The objects are listed through the emulator's JSON API (not through pyarrow, the code
under test). Checks the objects written (shards, manifests, the Ray
Train checkpoint under ``<out>/ray``, decoder weights, the commands' logs), that no temporary name
is left, that the embeddings equal those of the same run on local paths bit for bit, that a missing
bucket is refused with one line before any write, and fisher.io's helpers on the emulator.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (pip install -e '.[test]')")

from fisher import io as fio  # noqa: E402
from fisher.embedding import read_embeddings  # noqa: E402
from fisher.io import FisherError, manifest_hash, read_manifest  # noqa: E402
from raycluster import cli  # noqa: E402

BUCKET = "fisher-gcs-test"
EMULATOR = Path(__file__).with_name("_gcs_emulator.py")
N = 64                       # images per split
EMBED = ["--dim", "32", "--batch-size", "32", "--cpus-per-actor", "0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """The emulator's JSON API, read with plain HTTP."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/{path}", timeout=10) as r:
            return json.loads(r.read())

    def buckets(self) -> list[str]:
        return sorted(b["name"] for b in self.get("b?project=test").get("items", []))

    def keys(self, bucket: str = BUCKET) -> list[str]:
        listing = self.get(f"b/{bucket}/o")
        assert "nextPageToken" not in listing          # one page holds them all
        return sorted(o["name"] for o in listing.get("items", []))

    def read(self, key: str, bucket: str = BUCKET) -> bytes:
        quoted = urllib.request.quote(key, safe="")
        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10) as r:
            return r.read()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator (its bucket made at start), STORAGE_EMULATOR_HOST and this module's RAY_TMPDIR;
    Ray and the emulator stop afterwards."""
    import ray
    ray.shutdown()           # a Ray started before the variable was set would not see the emulator
    port = _free_port()
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with open(log, "wb") as err:
        server = subprocess.Popen([sys.executable, str(EMULATOR), "127.0.0.1", str(port), BUCKET],
                                  stdout=subprocess.DEVNULL, stderr=err)
    mp, ray_tmp = pytest.MonkeyPatch(), None
    try:
        emulator = Emulator(f"http://127.0.0.1:{port}")
        deadline = time.time() + 30
        while True:
            try:
                assert emulator.buckets() == [BUCKET]
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the GCS emulator did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        ray_tmp = tempfile.mkdtemp(prefix="fgcs", dir="/tmp")     # this module's own Ray sessions (short: sockets)
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
        yield emulator
    finally:
        ray.shutdown()
        server.terminate()
        server.wait(timeout=10)
        mp.undo()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _stages(data: str, emb: str, mnist_dir) -> list[list[str]]:
    return [["prepare", "mnist", "--src", str(mnist_dir), "--out", data, "--limit", str(N)],
            ["embed", "--prior", "builtin:mnist-pixelcnn", "--data", data, "--out", emb, *EMBED]]


@pytest.fixture(scope="module")
def run(gcs, tmp_path_factory, mnist_dir):
    """prepare → embed → train-decoder on gs://, from an empty working directory; the keys written."""
    cwd, old_cwd = tmp_path_factory.mktemp("cwd"), os.getcwd()
    before = set(gcs.keys())
    os.chdir(cwd)
    try:
        base = f"gs://{BUCKET}/pipe"
        for argv in _stages(f"{base}/data", f"{base}/emb", mnist_dir):
            assert cli.main(argv) == 0, argv
        assert cli.main(["train-decoder", "--embeddings", f"{base}/emb", "--data", f"{base}/data",
                         "--out", f"{base}/dec", "--epochs", "1", "--batch-size", "32",
                         "--cpus-per-worker", "0.5"]) == 0
    finally:
        os.chdir(old_cwd)
    return {"keys": sorted(k.removeprefix("pipe/") for k in set(gcs.keys()) - before),
            "cwd": sorted(os.listdir(cwd))}


def test_objects_written(run, gcs):
    keys = run["keys"]
    for name in ("data/manifest.json", "data/train-00000.parquet", "data/test-00000.parquet",
                 "emb/manifest.json", "emb/_plan.json", "emb/train-00000.parquet", "emb/test-00000.parquet",
                 "dec/manifest.json", "dec/weights.pt", "dec/module.json", "dec/metrics.json"):
        assert name in keys, (name, keys)
    # Ray Train's checkpoint went to <--out>/ray/<run name>/ in the bucket
    assert any(re.fullmatch(r"dec/ray/decoder/checkpoint_[^/]+/weights\.pt", k) for k in keys), \
        [k for k in keys if k.startswith("dec/ray")]
    for out, command in (("data", "prepare"), ("emb", "embed"), ("dec", "train-decoder")):
        logs = [k for k in keys if re.fullmatch(rf"{out}/logs/{command}-[0-9TZ]+-[0-9]+\.log", k)]
        assert len(logs) == 1, (out, keys)
        assert gcs.read(f"pipe/{logs[0]}").decode().startswith(f"fisher {command}: log of ")
    assert not [k for k in keys if ".tmp-" in k]           # every atomic write was renamed into place
    assert run["cwd"] == []


def test_manifests_read_back_and_chain(run):
    base = f"gs://{BUCKET}/pipe"
    data, emb = read_manifest(f"{base}/data", "prepare"), read_manifest(f"{base}/emb", "embed")
    dec = read_manifest(f"{base}/dec", "train-decoder")
    assert data["counts"] == {"train": N, "test": N}
    assert emb["inputs"]["data"] == manifest_hash(data)
    assert dec["inputs"] == {"embeddings": manifest_hash(emb), "data": manifest_hash(data)}
    assert dec["metrics"]["epoch"] == 1 and np.isfinite(dec["metrics"]["test_mse"])


def test_shards_equal_local_run(run, gcs, tmp_path, mnist_dir):
    """The prepared shards are the same bytes through either store; the embeddings are read back whole
    (test_s3.py checks them bit for bit against a local-path embed; here that embed would add an actor pool)."""
    assert cli.main(_stages(str(tmp_path / "data"), str(tmp_path / "emb"), mnist_dir)[0]) == 0
    for split in ("train", "test"):
        shard = f"data/{split}-00000.parquet"
        assert gcs.read(f"pipe/{shard}") == (tmp_path / shard).read_bytes()
        ids_gs, z_gs = read_embeddings(f"gs://{BUCKET}/pipe/emb", split)
        assert len(ids_gs) == N and z_gs.shape == (N, 32) and np.isfinite(z_gs).all()


def test_missing_bucket_is_refused(run, gcs, mnist_dir, capsys):
    uri = "gs://no-such-bucket/out"
    buckets, keys = gcs.buckets(), gcs.keys()
    local_logs = set(Path(tempfile.gettempdir()).glob("fisher-prepare-*.log"))
    capsys.readouterr()
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", uri, "--limit", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fisher prepare: error: {uri}: ") and "does not exist" in err[0], err
    assert gcs.buckets() == buckets and gcs.keys() == keys
    assert set(Path(tempfile.gettempdir()).glob("fisher-prepare-*.log")) == local_logs


def test_io_helpers_on_the_emulator(gcs):
    """fisher.io on gs://, without Ray: the helpers every stage builds on."""
    base = f"gs://{BUCKET}/io"
    fio.check_output(f"{base}/x")                          # the bucket exists: accepted
    with pytest.raises(FisherError, match=r"^gs://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        fio.check_output("gs://no-such-bucket/x")
    buckets = gcs.buckets()
    with pytest.raises(FisherError, match=r"^gs://no-such-bucket/x/y\.json: cannot write \("):
        fio.atomic_write_bytes("gs://no-such-bucket/x/y.json", b"{}")
    assert gcs.buckets() == buckets                        # no bucket made on the way
    table = pa.table({"id": np.arange(3000), "v": np.arange(3000) * 0.5})
    fio.atomic_write_table(f"{base}/a/t.parquet", table)
    fio.atomic_write_bytes(f"{base}/a/b.json", b"{}")
    assert [k for k in gcs.keys() if k.startswith("io/") and ".tmp-" in k] == []
    assert fio.exists(f"{base}/a/t.parquet") and not fio.exists(f"{base}/a/none")
    assert fio.is_dir(f"{base}/a") and not fio.is_dir(f"{base}/a/b.json")
    assert fio.list_files(f"{base}/a") == [f"{base}/a/b.json", f"{base}/a/t.parquet"]
    assert fio.list_files(f"{base}/a", ".parquet") == [f"{base}/a/t.parquet"]
    assert fio.read_table(f"{base}/a/t.parquet", ["v"])["v"].to_pylist() == table["v"].to_pylist()
    assert fio.parquet_metadata(f"{base}/a/t.parquet", rows=3000, columns=("id",)).num_rows == 3000
    assert fio.read_json(f"{base}/a/b.json", "record", "rerun") == {}
    with pytest.raises(FisherError, match="holds 3000 rows but its manifest says 5"):
        fio.parquet_metadata(f"{base}/a/t.parquet", rows=5)
    # a claim that no work followed is undone, the prefix with it
    before = fio.output_state(f"{base}/new")
    fio.claim_output(f"{base}/new", "embed", {"seed": 0})
    assert f"io/new/{fio.PLAN}" in gcs.keys()
    assert fio.release_claim(f"{base}/new", before)
    assert [k for k in gcs.keys() if k.startswith("io/new")] == [] and not fio.exists(f"{base}/new")
    # GCS prefixes without directory marker objects (``dir/``: fisher.io writes none there, nor do many
    # tools): a claim there with logs/ beside it is undone (pyarrow's delete_dir answers 404 for the
    # missing marker), and a subdirectory makes its parent "not empty" (pyarrow's one-level listing
    # misses it)
    for name, data in ((fio.PLAN, json.dumps({"stage": "embed"}).encode()), ("logs/embed-1.log", b"log")):
        fs, path = fio.resolve(f"{base}/bare/{name}")
        with fs.open_output_stream(path) as f:
            f.write(data)
    assert [k for k in gcs.keys() if k.startswith("io/bare")] == [f"io/bare/{fio.PLAN}", "io/bare/logs/embed-1.log"]
    assert fio.release_claim(f"{base}/bare", (False, False))
    assert [k for k in gcs.keys() if k.startswith("io/bare")] == []
    fs, path = fio.resolve(f"{base}/foreign/sub/f.bin")
    with fs.open_output_stream(path) as f:
        f.write(b"x")
    assert [k for k in gcs.keys() if k.startswith("io/foreign")] == ["io/foreign/sub/f.bin"]
    with pytest.raises(FisherError, match=r"io/foreign: not empty and not made by `fisher embed` \(holds sub\)"):
        fio.claim_output(f"{base}/foreign", "embed")

