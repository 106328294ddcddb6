"""``fisher embed --address`` on a three-node Ray cluster (``ray.cluster_utils.Cluster`` on loopback).

Every node has 2 logical CPUs and every actor asks for 1.5, so no node can host two actors: a
pool of two actors has to span two nodes. The embed manifest records which Ray node computed
which shard (``timing.nodes``); the shards must be byte-identical to the same projections
computed in this process without Ray. The pool is told to wait for both actors before it starts
(``wait_for_min_actors_s``), and every shard is its own block, so that a tiny run is not done by
one actor in one task.
"""
from __future__ import annotations

import json

import pytest
from _ray_helpers import (
    LOOPBACK,
    ONE_BLOCK_PER_SHARD,
    digests,
    listen_addresses,
    loopback_cluster,
    prepare,
    private_ray_tmp,
    reference_embeddings,
    tiny_prior,
)

from raycluster import cli

DIMS, DENSITIES = [16, 32], [None, 1.0]
pytestmark = pytest.mark.slow


def test_embed_spans_nodes_and_matches_one_process(tmp_path, mnist_dir, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 120)
    loopback_cluster(monkeypatch)
    for k, v in ONE_BLOCK_PER_SHARD.items():
        monkeypatch.setenv(k, v)
    data = prepare(mnist_dir, tmp_path / "data", limit=64, shard_size=16)          # 8 shards
    prior = tiny_prior(tmp_path / "prior")
    ref = reference_embeddings(prior, data, tmp_path / "ref", DIMS, DENSITIES)
    out = tmp_path / "emb"
    with private_ray_tmp() as ray_tmp:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            assert cli.main(["embed", "--prior", str(prior), "--data", str(data), "--out", str(out),
                             "--dim", "16,32", "--density", "auto,1", "--address", cluster.address,
                             "--actors", "2", "--cpus-per-actor", "1.5", "--batch-size", "8"]) == 0
            cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            listening = listen_addresses(ray_tmp)
        finally:
            ray.shutdown()
            cluster.shutdown()

    assert len(cluster_nodes) == 3
    assert listening and listening <= LOOPBACK, listening
    manifest = json.loads((out / "manifest.json").read_text())
    nodes = manifest["timing"]["nodes"]                      # node id -> shards it computed rows of
    assert len(nodes) == 2 and set(nodes) <= cluster_nodes   # two actors, necessarily on two nodes
    assert set().union(*map(set, nodes.values())) == set(manifest["shards"])
    assert len(manifest["shards"]) == 8
    assert digests(out) == digests(ref)                      # bitwise, every shard
