"""Remote storage end to end: ``fisher run --data s3://… --out s3://…`` (raw MNIST in the bucket; every
step, its Ray Train checkpoints, the sweep's Ray Tune storage, the FID cache, the report and the run's
log in the bucket), then a rerun that reuses every step.

A real S3-compatible server (moto's server mode) runs on 127.0.0.1 for the module; pyarrow (driver,
Ray Data read tasks, Ray Train workers and their checkpoint uploads) finds it through
``AWS_ENDPOINT_URL``, set before the module's local Ray starts so every Ray process inherits it. Checks
the objects written, that the report's images are there beside it (referenced relatively), that nothing
lands on local disk outside tmp, that the prior and the embeddings equal those of the same stages on
local paths bit for bit, and that a missing bucket is refused with one line before any write.
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
from fisher.io import read_bytes, read_manifest  # noqa: E402
from raycluster import cli  # noqa: E402

BUCKET = "fisher-s3-test"
RUN = f"s3://{BUCKET}/run"
WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS} absent (set FISHER_SHARED_DATA)")
N = 64                       # images per split
PRIOR = {"layers": 1, "filters": 4, "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5}
PRESET = {
    "description": "toy, on S3", "dataset": "mnist",
    "prepare": {"limit": N, "seed": 0},
    "prior": {"train": True, **PRIOR},
    "embed": {"dim": 16, "density": 1.0, "seed": 0, "actors": 1, "batch_size": 32, "cpus_per_actor": 0.5},
    "sweep": {"grid": None, "epochs": 1, "batch_size": 32, "cpus_per_trial": 0.5},      # grid: a one-cell file
    "decoder": {"decoder": "conv", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5},
    "interpolate": {"pairs": 2},
    "evaluate": {"pairs": 4, "real_limit": 8, "alphas": [0.5], "batch_size": 4, "floor": False},
    "kinds": ["fisher"],
}
STEPS = ["prepare", "train-prior", "baselines", "sweep", "probe-fisher", "decoder-fisher", "interpolate-fisher",
         "fid-fisher"]


def _local_stages(data: str, prior: str, emb: str, mnist_dir) -> list[list[str]]:
    """The run's prepare, train-prior and Fisher embedding as stages on local paths."""
    flags = [x for k, v in PRIOR.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return [["prepare", "mnist", "--src", str(mnist_dir), "--out", data, "--limit", str(N)],
            ["train-prior", "--data", data, "--out", prior, *flags],
            ["embed", "--prior", prior, "--data", data, "--out", emb, "--dim", "16", "--density", "1", "--batch-size", "32",
             "--cpus-per-actor", "0.5"]]


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
    """``fisher run`` with raw data and output in the bucket, from an empty working directory; returns the
    keys written, what appeared on local disk, and the argv (for the rerun)."""
    for f in sorted(mnist_dir.glob("*-ubyte*")):
        s3.upload_file(str(f), BUCKET, f"raw/{f.name}")
    root = tmp_path_factory.mktemp("preset")
    (root / "grid.json").write_text(json.dumps({"density": [1.0], "dim": [16]}))
    preset = {**PRESET, "sweep": {**PRESET["sweep"], "grid": str(root / "grid.json")}}
    (root / "toy.json").write_text(json.dumps(preset))
    argv = ["run", "--preset", str(root / "toy.json"), "--data", f"s3://{BUCKET}/raw", "--out", RUN,
            "--fid-weights", str(WEIGHTS)]
    cwd = tmp_path_factory.mktemp("cwd")
    repo, old_cwd = Path.cwd(), os.getcwd()
    repo_before, ray_results_before, started = set(os.listdir(repo)), _ray_results(), time.time()
    os.chdir(cwd)
    try:
        assert cli.main(argv) == 0
    finally:
        os.chdir(old_cwd)
    local = {"cwd": sorted(os.listdir(cwd)), "repo_new": sorted(set(os.listdir(repo)) - repo_before),
             "ray_results_new": sorted(p for p, t in _ray_results().items()
                                       if p not in ray_results_before or t > max(started, ray_results_before[p]))}
    return {"keys": _keys(s3), "local": local, "argv": argv}


def _run_keys(keys: list[str]) -> set[str]:
    return {k[len("run/"):] for k in keys if k.startswith("run/")}


def test_objects_written(run):
    keys = _run_keys(run["keys"])
    for name in ("data/manifest.json", "data/train-00000.parquet", "data/test-00000.parquet",
                 "prior/manifest.json", "prior/weights.pt", "prior/module.json", "baselines/baselines.json",
                 "sweep/manifest.json", "sweep/grid.md", "sweep/grid.png", "sweep/cells/z.json",
                 "sweep/embeddings/manifest.json", "sweep/embeddings/train-00000.parquet",
                 "decoder-fisher/manifest.json", "decoder-fisher/weights.pt", "decoder-fisher/module.json",
                 "interpolate-fisher/manifest.json", "interpolate-fisher/interpolations.png",
                 "fid-fisher/fid.json", "fid-fisher/fid.md", "fid-fisher/manifest.json", "probe-fisher/probe.json",
                 "report.md", "timings.json", "environment.json", "preset.json"):
        assert name in keys, (name, sorted(keys))
    # Ray Train checkpoints went to <step>/ray/<run name>/ in the bucket, Ray Tune's storage to sweep/tune
    for out, run_name in (("prior", "prior"), ("decoder-fisher", "decoder")):
        pattern = re.compile(rf"{out}/ray/{run_name}/checkpoint_[^/]+/weights\.pt")
        assert any(pattern.fullmatch(k) for k in keys), (out, [k for k in keys if k.startswith(out + "/ray")])
    assert any(re.fullmatch(r"sweep/tune/sweep/[^/]+/checkpoint_[^/]+/weights\.pt", k) for k in keys), \
        [k for k in keys if k.startswith("sweep/tune")]
    assert any(re.fullmatch(r"data/fid-cache/fid-stats-[^/]+-8\.npz", k) for k in keys), keys
    logs = [k for k in keys if k.startswith("logs/") and k != "logs/"]      # "logs/": a directory marker
    assert len(logs) == 1 and re.fullmatch(r"logs/run-[^/]+\.log", logs[0]), logs
    assert not [k for k in keys if ".tmp-" in k]           # every atomic write was renamed into place
    assert list(json.loads(read_bytes(f"{RUN}/timings.json"))) == STEPS
    # manifests read back through pyarrow, and they chain by hash
    assert read_manifest(f"{RUN}/decoder-fisher", "train-decoder")["inputs"]["embeddings"]
    assert read_manifest(f"{RUN}/prior", "train-prior")["metrics"]["epoch"] == 1


def test_report_reads_from_the_bucket(run):
    report = read_bytes(f"{RUN}/report.md").decode()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert "sweep/grid.png" in images and "interpolate-fisher/interpolations.png" in images
    keys = _run_keys(run["keys"])
    assert all("://" not in i and not i.startswith("/") and i in keys for i in images), images   # relative, present
    fid = json.loads(read_bytes(f"{RUN}/fid-fisher/fid.json"))
    assert f"{fid['fid']['0.5']:.2f}" in report and "## Environment" in report


def test_log_uploaded_with_rays_lines(run):
    log = next(k for k in run["keys"] if k.startswith("run/logs/run-"))
    text = read_bytes(f"s3://{BUCKET}/{log}").decode()
    assert "[run 1/" in text and re.search(r"^\((\S+ )?pid=\d+", text, re.M)


def test_nothing_written_locally(run):
    assert run["local"] == {"cwd": [], "repo_new": [], "ray_results_new": []}


def test_rerun_reuses_every_step(run, s3, capsys):
    report = read_bytes(f"{RUN}/report.md")
    capsys.readouterr()
    assert cli.main(run["argv"]) == 0
    said = capsys.readouterr().out
    assert all(f"[run {k}/{len(STEPS)}] {step}: done before, reused" in said for k, step in enumerate(STEPS, 1)), said
    assert read_bytes(f"{RUN}/report.md") == report
    new = set(_keys(s3)) - set(run["keys"])
    assert len(new) == 1 and next(iter(new)).startswith("run/logs/run-"), new     # only the rerun's own log


def test_prior_and_embeddings_equal_local_run(run, tmp_path, mnist_dir):
    for argv in _local_stages(str(tmp_path / "data"), str(tmp_path / "prior"), str(tmp_path / "emb"), mnist_dir):
        assert cli.main(argv) == 0, argv
    remote_prior = read_manifest(f"{RUN}/prior")
    assert read_manifest(str(tmp_path / "prior"))["weights_sha256"] == remote_prior["weights_sha256"]
    for split in ("train", "test"):
        ids_s3, z_s3 = read_embeddings(f"{RUN}/sweep/embeddings", split)
        ids_local, z_local = read_embeddings(str(tmp_path / "emb"), split)
        assert len(ids_s3) == N and list(ids_s3) == list(ids_local)
        assert z_s3.dtype == z_local.dtype == np.float32 and z_s3.tobytes() == z_local.tobytes()


@pytest.mark.parametrize("stage", ["prepare", "train-prior"])
def test_missing_bucket_is_refused(run, s3, mnist_dir, capsys, stage):
    before_buckets, before_keys = [b["Name"] for b in s3.list_buckets()["Buckets"]], _keys(s3)
    uri = "s3://no-such-bucket-fisher/out"
    argv = {"prepare": ["prepare", "mnist", "--src", str(mnist_dir), "--out", uri, "--limit", "8"],
            "train-prior": ["train-prior", "--data", f"{RUN}/data", "--out", uri, "--epochs", "1"]}[stage]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fisher {stage}: error: {uri}: ") and "does not exist" in err[0]
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == before_buckets
    assert _keys(s3) == before_keys
