"""prepare → train-prior → embed through the ``fisher`` CLI on real MNIST (small slice).

One local Ray instance serves the whole module. Checks the issue's "done"
criteria: exact scores against a one-backward-per-image reference, eq. 1
projection, bitwise identity across batch sizes and actor counts, idempotent
reruns, refusal of mismatched inputs, PCA/standardization fitted on train.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from fisher.data import load_prepared
from fisher.embedding import read_embeddings
from fisher.models import load_prior, to_model_input
from fisher.projection import SparseProjection
from fisher.scores import fisher_scores_reference, n_features
from raycluster import cli

N = 192          # images per split


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    import ray
    root = tmp_path_factory.mktemp("pipeline")
    data, prior = root / "data", root / "prior"
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", str(data),
                     "--limit", str(N), "--shard-size", "64"]) == 0
    assert cli.main(["train-prior", "--data", str(data), "--out", str(prior), "--epochs", "1",
                     "--layers", "2", "--filters", "8", "--batch-size", "32"]) == 0
    yield root
    ray.shutdown()


def _embed(root, out, *extra):
    return cli.main(["embed", "--prior", str(root / "prior"), "--data", str(root / "data"),
                     "--out", str(root / out), "--dim", "48,96", "--density", "auto,1", *extra])


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.parquet"))}


def test_local_ray_listens_on_loopback_only(run):
    """The Ray that train-prior started (it is the first stage to need one) binds 127.0.0.1 only."""
    import ray
    from _ray_helpers import LOOPBACK, listen_addresses
    session = ray._private.worker._global_node.get_session_dir_path()
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    listening = listen_addresses(session)
    assert listening and listening <= LOOPBACK, listening


def test_prior_trained_and_loadable(run):
    manifest = json.loads((run / "prior" / "manifest.json").read_text())
    assert manifest["stage"] == "train-prior" and manifest["metrics"]["epoch"] == 1
    assert np.isfinite(manifest["metrics"]["test_nll_nats"])
    model = load_prior(run / "prior")
    assert model.config.n_layers == 2 and model.config.filters == 8
    # rerunning the same command is a no-op
    before = (run / "prior" / "weights.pt").read_bytes()
    assert cli.main(["train-prior", "--data", str(run / "data"), "--out", str(run / "prior"), "--epochs", "1",
                     "--layers", "2", "--filters", "8", "--batch-size", "32"]) == 0
    assert (run / "prior" / "weights.pt").read_bytes() == before


def test_prior_continues_from_last_checkpoint(run, capsys):
    args = ["train-prior", "--data", str(run / "data"), "--out", str(run / "prior2"), "--layers", "1",
            "--filters", "4", "--batch-size", "64"]
    assert cli.main([*args, "--epochs", "1"]) == 0
    assert cli.main([*args, "--epochs", "2"]) == 0          # continues: only epoch 2 is trained
    metrics = json.loads((run / "prior2" / "manifest.json").read_text())["metrics"]
    assert metrics["epoch"] == 2 and metrics["resumed_after_epoch"] == 1
    capsys.readouterr()
    assert cli.main([*args, "--epochs", "1"]) == 2          # fewer epochs than done: refused
    assert "already trained for 2 epochs" in capsys.readouterr().err
    assert cli.main([*args[:-2], "--batch-size", "32", "--epochs", "2"]) == 2   # another config: refused


def test_embeddings_exact_and_invariant(run, capsys):
    assert _embed(run, "emb_a", "--actors", "1", "--batch-size", "64") == 0
    assert _embed(run, "emb_b", "--actors", "2", "--batch-size", "40") == 0
    a, b = _digests(run / "emb_a"), _digests(run / "emb_b")
    assert len(a) == 6 and a == b                       # bitwise identical across batch sizes and actors

    manifest = json.loads((run / "emb_a" / "manifest.json").read_text())
    assert set(manifest["columns"]) == {"z_d48_pauto", "z_d48_p1", "z_d96_pauto", "z_d96_p1"}
    assert manifest["counts"] == {"train": N, "test": N}
    # output streams batch by batch: a block holds at most one batch plus a short remainder (< 3/4 batch),
    # not Ray Data's default 128 MiB or a whole input bundle
    assert 0 < manifest["timing"]["largest_block_rows"] < 2 * 64
    assert 0 < json.loads((run / "emb_b" / "manifest.json").read_text())["timing"]["largest_block_rows"] < 2 * 40

    model = load_prior(run / "prior")
    n = n_features(model)
    images = load_prepared(str(run / "data"), "test")
    ids, z = read_embeddings(str(run / "emb_a"), "test", "z_d96_pauto")
    assert list(ids) == sorted(images["id"].tolist())
    order = np.argsort(images["id"])[:6]
    g_ref = fisher_scores_reference(model, to_model_input(images["image"][order]))
    P = SparseProjection(n, 96, None, seed=0).dense()
    z_ref = (g_ref @ P.t()).numpy()
    rel = np.linalg.norm(z[:6] - z_ref) / np.linalg.norm(z_ref)
    assert rel <= 1e-4
    # the eq. 1 projection approximately preserves norms of real scores (JL)
    ratio = (z_ref ** 2).sum(1) / (g_ref.numpy() ** 2).sum(1)
    assert 0.5 < ratio.mean() < 1.5

    # rerun: everything already there, same bytes
    capsys.readouterr()
    assert _embed(run, "emb_a", "--actors", "1", "--batch-size", "64") == 0
    assert "6 of 6 shards already done" in capsys.readouterr().out
    assert _digests(run / "emb_a") == a


def test_embed_refuses_other_projection_seed(run, capsys):
    assert _embed(run, "emb_seed", "--splits", "test") == 0
    capsys.readouterr()
    assert _embed(run, "emb_seed", "--splits", "test", "--seed", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "emb_seed" in err[0] and "seed" in err[0]


def test_activation_baseline_with_pca(run):
    assert cli.main(["embed", "--prior", str(run / "prior"), "--data", str(run / "data"), "--out",
                     str(run / "act"), "--kind", "activation", "--dim", "64", "--standardize", "--pca", "16"]) == 0
    _, z = read_embeddings(str(run / "act"), "train", "z")
    _, zt = read_embeddings(str(run / "act"), "train", "z_t")
    _, zt_test = read_embeddings(str(run / "act"), "test", "z_t")
    assert z.shape == (N, 64) and zt.shape == (N, 16) and zt_test.shape == (N, 16)
    assert np.allclose(zt.mean(0), 0, atol=1e-3)              # centred on train
    # PCA components are orthonormal and ordered by explained variance
    var = zt.var(0)
    assert np.all(np.diff(var) <= 1e-3)
    model = load_prior(run / "prior")
    images = load_prepared(str(run / "data"), "train")
    h = model.hidden(to_model_input(images["image"][:1])).detach().flatten(1)
    assert h.shape[1] == 8 * 28 * 28
    with torch.no_grad():
        P = SparseProjection(h.shape[1], 64, None, seed=0)
        first = np.argsort(images["id"])[0]
        z_one = P.project(model.hidden(to_model_input(images["image"][first:first + 1])).flatten(1))
    assert np.allclose(z[0], z_one.numpy()[0], rtol=1e-4, atol=1e-5)


def test_train_decoder_reports_and_continues(run, capsys):
    assert _embed(run, "emb_a", "--actors", "1", "--batch-size", "64") == 0
    args = ["train-decoder", "--embeddings", str(run / "emb_a"), "--data", str(run / "data"),
            "--column", "z_d48_p1", "--out", str(run / "dec"), "--batch-size", "64"]
    assert cli.main([*args, "--epochs", "1"]) == 0
    m = json.loads((run / "dec" / "manifest.json").read_text())["metrics"]
    assert math.isfinite(m["test_bce_nats_per_pixel"]) and m["test_bce_nats_per_pixel"] > 0 and 0 <= m["test_mse"] <= 1
    assert m["test_nll_shuffled_z_nats_per_image"] > m["test_nll_nats_per_image"] * 0.5    # measured, and sane
    assert "worse given another image's z" in capsys.readouterr().out
    from fisher.decoders import load_decoder
    decoder = load_decoder(str(run / "dec"))
    assert decoder(torch.zeros(2, 48)).shape == (2, 1, 28, 28)
    assert cli.main([*args, "--epochs", "2"]) == 0                    # continues after epoch 1
    m = json.loads((run / "dec" / "manifest.json").read_text())["metrics"]
    assert m["epoch"] == 2 and m["resumed_after_epoch"] == 1
    capsys.readouterr()
    assert cli.main([*args[:6], "nope", *args[7:], "--epochs", "2"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
