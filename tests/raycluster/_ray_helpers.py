"""Shared by the multi-node, fault and job-submission tests (not a test module).

- :func:`private_ray_tmp`: a short, private ``RAY_TMPDIR``, so the Ray instances a test starts keep
  their sessions, sockets and address file apart from any other Ray on the machine, and can be
  stopped by that directory alone (``ray stop`` would stop every Ray on the machine).
- :func:`tiny_prior`, :func:`prepare`: small inputs without Ray.
- :func:`reference_embeddings`: the shards ``fisher embed`` must produce, computed in this process
  with the same :class:`fisher.embedding.Embedder`, without Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

from raycluster import cli

CLI = [sys.executable, "-m", "raycluster.cli"]     # the `fisher` command, as a subprocess


@contextlib.contextmanager
def private_ray_tmp(prefix: str = "fr"):
    """Set ``RAY_TMPDIR`` to a new short directory under /tmp (unix socket paths must stay short);
    on exit stop any process still running from it and remove it."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        kill_ray_processes(path)
        shutil.rmtree(path, ignore_errors=True)


def loopback_cluster(monkeypatch) -> None:
    """:func:`raycluster.runtime.loopback_only`, undone after the test: Ray rewrites 127.0.0.1 to the
    machine's own IP (``resolve_ip_for_localhost``), both for a node's address, whose servers then
    listen on every interface, and for the address a driver joins; with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (this process and the ones it starts) it stays 127.0.0.1."""
    from ray._private import ray_constants
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)


# Ray Data packs Parquet row groups into read units of RAY_DATA_PARQUET_BIN_PACKING_BYTES
# (raycluster.runtime.read_shards: 1 MiB), so a few KB of test shards would be one block, run by
# one actor as one task. One byte makes every row group (here: every shard) its own block.
ONE_BLOCK_PER_SHARD = {"RAY_DATA_PARQUET_BIN_PACKING_BYTES": "1"}


def ray_processes(marker: str) -> list:
    """Processes whose command line mentions ``marker`` (a private Ray temp dir): the GCS, raylets,
    dashboard and agents of the Ray instances started under it. Never this process."""
    psutil = _psutil()
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(a.endswith(marker) or f"{marker}/" in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _psutil():
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
    import psutil
    return psutil


def listen_addresses(marker: str) -> set[str]:
    """The IPs that the processes of ``marker`` accept connections on."""
    psutil = _psutil()
    ips = set()
    for p in ray_processes(marker):
        with contextlib.suppress(psutil.Error):
            ips |= {c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    return ips


def kill_ray_processes(marker: str, grace: float = 5.0) -> int:
    """``ray stop`` for one instance only: SIGTERM the processes of ``marker``, SIGKILL what is left."""
    psutil = _psutil()
    procs = ray_processes(marker)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(procs)


def prepare(src, out: Path, limit: int, shard_size: int) -> Path:
    assert cli.main(["prepare", "mnist", "--src", str(src), "--out", str(out), "--limit", str(limit),
                     "--shard-size", str(shard_size)]) == 0
    return out


def tiny_prior(out: Path, layers: int = 2, filters: int = 8, seed: int = 0) -> Path:
    """An untrained PixelCNN written as a `train-prior` artifact (embedding tests need no training)."""
    import torch

    from fisher.io import write_manifest
    from fisher.models import PixelCNN, PixelCNNConfig, save_prior
    torch.manual_seed(seed)
    save_prior(PixelCNN(PixelCNNConfig(n_layers=layers, filters=filters)), str(out))
    write_manifest(str(out), "train-prior", {"note": "untrained test prior", "layers": layers,
                                             "filters": filters, "seed": seed})
    return out


def reference_embeddings(prior: Path, data: Path, out: Path, dims, densities, seed: int = 0,
                         chunk: int | None = None, kind: str = "fisher") -> Path:
    """Write the shards ``fisher embed --prior --data --dim --density --seed --chunk-size`` must
    write, byte for byte, computed here in one process without Ray."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # many threads on a busy 2-core machine crawl
    try:
        return _reference(prior, data, out, dims, densities, seed, chunk, kind)
    finally:
        torch.set_num_threads(threads)


def _reference(prior, data, out, dims, densities, seed, chunk, kind):
    from fisher.data import decode_images
    from fisher.embedding import Embedder, EmbedSpec, embedding_table
    from fisher.io import atomic_write_table, manifest_hash, read_manifest, read_table
    from fisher.models import load_prior
    data_manifest = read_manifest(str(data), "prepare")
    shape = data_manifest["image_shape"]
    specs = [EmbedSpec(d, p) for d, p in itertools.product(dims, densities)]
    embedder = Embedder(load_prior(str(prior)), kind, specs, shape, seed=seed, chunk_size=chunk)
    meta = {"kind": kind, "seed": seed, "prior": manifest_hash(read_manifest(str(prior))),
            "chunk_size": embedder.chunk}                  # the default (None) resolved as `fisher embed` does
    out.mkdir(parents=True, exist_ok=True)
    for shard in data_manifest["shards"]:
        table = read_table(str(data / shard["file"]), ["id", "image"])
        cols = embedder(decode_images(table, shape))
        ids = table["id"].to_numpy(zero_copy_only=False).astype(object)
        atomic_write_table(str(out / shard["file"]), embedding_table(ids, cols, meta))
    return out


def digests(path: Path) -> dict[str, str]:
    """sha256 of every finished Parquet shard in ``path`` (temporary files excluded)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).glob("*.parquet"))}


def temp_leftovers(path: Path) -> list[str]:
    """Temporary files of interrupted atomic writes (``.NAME.tmp-XXXX``)."""
    return sorted(p.name for p in Path(path).iterdir() if ".tmp-" in p.name)
