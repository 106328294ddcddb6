"""Remote storage: prepare → train-prior → embed → train-decoder → sweep → interpolate → evaluate,
every ``--out`` an ``s3://`` URI.

A real S3-compatible server (moto's server mode) runs on 127.0.0.1 for the
module; pyarrow (driver, Ray Data read tasks, Ray Train workers and their
checkpoint uploads) finds it through ``AWS_ENDPOINT_URL``, set before the
module's local Ray starts so every Ray process inherits it. Checks the
objects written (shards, manifests, Ray Train checkpoints under
``<out>/ray``, the sweep's Ray Tune storage, decoder weights, the FID cache), that nothing lands on local disk outside
tmp, that the embeddings equal those of the same run on local paths bit for
bit, and that a missing bucket is refused with one line before any write.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
boto3 = pytest.importorskip("boto3")

from conftest import SHARED_DATA  # noqa: E402

from fisher.embedding import read_embeddings  # noqa: E402
from fisher.io import read_manifest  # noqa: E402
from raycluster import cli  # noqa: E402

BUCKET = "fisher-s3-test"
WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
N = 64                       # images per split
PRIOR = ["--epochs", "1", "--layers", "1", "--filters", "4", "--batch-size", "32", "--cpus-per-worker", "0.5"]
EMBED = ["--dim", "32", "--batch-size", "32", "--cpus-per-actor", "0.5"]


def _stages(data: str, prior: str, emb: str, mnist_dir) -> list[list[str]]:
    return [["prepare", "mnist", "--src", str(mnist_dir), "--out", data, "--limit", str(N)],
            ["train-prior", "--data", data, "--out", prior, *PRIOR],
            ["embed", "--prior", prior, "--data", data, "--out", emb, *EMBED]]


def _ray_results() -> dict[str, float]:
    root = Path.home() / "ray_results"
    return {str(p): p.stat().st_mtime for p in root.rglob("*")} if root.exists() else {}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The moto server, its bucket and the AWS_* environment; Ray and the server stop afterwards."""
    import ray
    from moto.server import ThreadedMotoServer
    ray.shutdown()           # a Ray started before the variables were set would not see the endpoint
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    mp, ray_tmp = pytest.MonkeyPatch(), None
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        home = tmp_path_factory.mktemp("aws")
        ray_tmp = tempfile.mkdtemp(prefix="fs3", dir="/tmp")     # this module's own Ray sessions (short: sockets)
        mp.setenv("RAY_TMPDIR", ray_tmp)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            mp.delenv(name, raising=False)
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                            "AWS_CONFIG_FILE": str(home / "config"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials")}.items():
            mp.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        ray.shutdown()
        server.stop()
        mp.undo()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _keys(client, bucket: str = BUCKET) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def run(s3, tmp_path_factory, mnist_dir):
    """The four stages on s3://, run from an empty working directory; returns the written keys."""
    cwd = tmp_path_factory.mktemp("cwd")
    repo, old_cwd = Path.cwd(), os.getcwd()
    repo_before, ray_results_before, started = set(os.listdir(repo)), _ray_results(), time.time()
    os.chdir(cwd)
    try:
        base = f"s3://{BUCKET}"
        for argv in _stages(f"{base}/data", f"{base}/prior", f"{base}/emb", mnist_dir):
            assert cli.main(argv) == 0, argv
        assert cli.main(["train-decoder", "--embeddings", f"{base}/emb", "--data", f"{base}/data",
                         "--out", f"{base}/dec", "--epochs", "1", "--batch-size", "32",
                         "--cpus-per-worker", "0.5"]) == 0
        grid = tmp_path_factory.mktemp("grid") / "grid.json"      # one cell: the sweep's Tune storage on S3
        grid.write_text(json.dumps({"density": [1.0], "dim": [16]}))
        assert cli.main(["sweep", "--prior", f"{base}/prior", "--data", f"{base}/data", "--out", f"{base}/sweep",
                         "--grid", str(grid), "--epochs", "1", "--batch-size", "32", "--cpus-per-trial", "0.5",
                         "--embed-actors", "1"]) == 0
        views = ["--decoder", f"{base}/dec", "--embeddings", f"{base}/emb", "--data", f"{base}/data"]
        assert cli.main(["interpolate", *views, "--out", f"{base}/interp", "--pairs", "2"]) == 0
        if WEIGHTS.exists():          # FID with the real statistics cached in the bucket (DATA/fid-cache)
            assert cli.main(["evaluate", *views, "--out", f"{base}/fid", "--pairs", "4", "--alphas", "0",
                             "--real-limit", "8", "--no-floor", "--fid-weights", str(WEIGHTS),
                             "--batch-size", "4"]) == 0
    finally:
        os.chdir(old_cwd)
    local = {"cwd": sorted(os.listdir(cwd)), "repo_new": sorted(set(os.listdir(repo)) - repo_before),
             "ray_results_new": sorted(p for p, t in _ray_results().items()
                                       if p not in ray_results_before or t > max(started, ray_results_before[p]))}
    return {"keys": _keys(s3), "local": local}


def test_objects_written(run):
    keys = run["keys"]
    for name in ("data/manifest.json", "data/train-00000.parquet", "data/test-00000.parquet",
                 "prior/manifest.json", "prior/weights.pt", "prior/module.json",
                 "emb/manifest.json", "emb/_plan.json", "emb/train-00000.parquet", "emb/test-00000.parquet",
                 "dec/manifest.json", "dec/weights.pt", "dec/module.json", "dec/metrics.json"):
        assert name in keys, (name, keys)
    # Ray Train checkpoints went to <--out>/ray/<run name>/ in the bucket
    for out, run_name in (("prior", "prior"), ("dec", "decoder")):
        pattern = re.compile(rf"{out}/ray/{run_name}/checkpoint_[^/]+/weights\.pt")
        assert any(pattern.fullmatch(k) for k in keys), (out, [k for k in keys if k.startswith(out + "/ray")])
    for name in ("sweep/manifest.json", "sweep/grid.md", "sweep/grid.png", "sweep/cells/z.json",
                 "sweep/embeddings/manifest.json", "interp/manifest.json", "interp/interpolations.png"):
        assert name in keys, (name, keys)
    assert any(re.fullmatch(r"sweep/tune/sweep/[^/]+/checkpoint_[^/]+/weights\.pt", k) for k in keys), \
        [k for k in keys if k.startswith("sweep/tune")]                 # Ray Tune's storage_path is the bucket
    if WEIGHTS.exists():
        assert {"fid/fid.json", "fid/fid.md", "fid/manifest.json"} <= set(keys)
        assert any(re.fullmatch(r"data/fid-cache/fid-stats-[^/]+-8\.npz", k) for k in keys), keys
    assert not [k for k in keys if ".tmp-" in k]           # every atomic write was renamed into place
    # manifests read back through pyarrow, and they chain by hash
    assert read_manifest(f"s3://{BUCKET}/dec", "train-decoder")["inputs"]["embeddings"]
    assert read_manifest(f"s3://{BUCKET}/prior", "train-prior")["metrics"]["epoch"] == 1


def test_nothing_written_locally(run):
    assert run["local"] == {"cwd": [], "repo_new": [], "ray_results_new": []}


def test_embeddings_equal_local_run(run, tmp_path, mnist_dir):
    for argv in _stages(str(tmp_path / "data"), str(tmp_path / "prior"), str(tmp_path / "emb"), mnist_dir):
        assert cli.main(argv) == 0, argv
    remote_prior = read_manifest(f"s3://{BUCKET}/prior")
    assert read_manifest(str(tmp_path / "prior"))["weights_sha256"] == remote_prior["weights_sha256"]
    for split in ("train", "test"):
        ids_s3, z_s3 = read_embeddings(f"s3://{BUCKET}/emb", split)
        ids_local, z_local = read_embeddings(str(tmp_path / "emb"), split)
        assert len(ids_s3) == N and list(ids_s3) == list(ids_local)
        assert z_s3.dtype == z_local.dtype == np.float32 and z_s3.tobytes() == z_local.tobytes()


@pytest.mark.parametrize("stage", ["prepare", "train-prior"])
def test_missing_bucket_is_refused(run, s3, mnist_dir, capsys, stage):
    before_buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    uri = "s3://no-such-bucket-fisher/out"
    argv = {"prepare": ["prepare", "mnist", "--src", str(mnist_dir), "--out", uri, "--limit", "8"],
            "train-prior": ["train-prior", "--data", f"s3://{BUCKET}/data", "--out", uri, *PRIOR]}[stage]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fisher {stage}: error: {uri}: ") and "does not exist" in err[0]
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == before_buckets
    assert _keys(s3) == run["keys"]
