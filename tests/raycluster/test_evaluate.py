"""``fisher interpolate``, ``edit`` and ``evaluate`` (paper Figures 2/4/5, Algorithm 1) on tiny real inputs.

One module fixture: prepared MNIST (64 images per split) → a 1-layer prior → 16-dim Fisher embeddings →
a conv decoder (one epoch, fit in-process). The FID test runs the real Inception weights on Ray with
4 pairs × 2 alphas against 8 real images (Inception and the 2048-d matrix square root are slow on this
CPU), and is skipped when the weights file is absent.
"""
from __future__ import annotations

import json
import math
import os
import urllib.error

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from raycluster import cli

WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
needs_weights = pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS} absent (set FISHER_SHARED_DATA)")


def _fit_and_save(emb: str, data: str, out: str, levels: int, shape, z_dim: int) -> None:
    from fisher.decoders import DecoderTrainConfig, fit_decoder, save_decoder
    from fisher.embedding import load_pairs
    from fisher.models import to_model_input
    t = {s: load_pairs(emb, data, s) for s in ("train", "test")}
    arrays = [a for s in ("train", "test") for a in (torch.from_numpy(t[s]["z"]), to_model_input(t[s]["image"]))]
    decoder, _ = fit_decoder(DecoderTrainConfig(epochs=1, batch_size=32), *arrays, levels, shape)
    save_decoder(decoder, out)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    import ray
    root = tmp_path_factory.mktemp("evaluate")
    d = {k: str(root / k) for k in ("data", "prior", "emb", "decoder")}
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", d["data"], "--limit", "64",
                     "--shard-size", "64"]) == 0
    assert cli.main(["train-prior", "--data", d["data"], "--out", d["prior"], "--epochs", "1", "--layers", "1",
                     "--filters", "4", "--batch-size", "32"]) == 0
    assert cli.main(["embed", "--prior", d["prior"], "--data", d["data"], "--out", d["emb"], "--dim", "16"]) == 0
    _fit_and_save(d["emb"], d["data"], d["decoder"], 2, [28, 28, 1], 16)
    d["root"] = root
    yield d
    ray.shutdown()


def _inputs(d, *extra):
    return ["--decoder", d["decoder"], "--embeddings", d["emb"], "--data", d["data"], "--column", "z", *extra]


def test_interpolate_png(run, tmp_path):
    from fisher.data import load_prepared
    out = tmp_path / "interp"
    assert cli.main(["interpolate", *_inputs(run), "--pairs", "3", "--out", str(out)]) == 0
    im = Image.open(out / "interpolations.png")
    assert im.mode == "L" and im.size == (11 * 30 + 2, 3 * 30 + 2)      # 9 alphas + 2 true images, 28 + 2 pad
    a = np.asarray(im)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "interpolate" and manifest["config"]["alphas"] == [i / 8 for i in range(9)]
    test = load_prepared(run["data"], "test")
    by_id = dict(zip(test["id"], test["image"][..., 0]))
    (x1, x2), *_ = manifest["pair_ids"]
    assert np.array_equal(a[2:30, 2:30], by_id[x1] * 255)                 # first tile: the true image x1
    assert np.array_equal(a[2:30, 10 * 30 + 2:10 * 30 + 30], by_id[x2] * 255)
    assert set(manifest["inputs"]) == {"data", "embeddings", "decoder"}


@needs_weights
def test_evaluate_fid_with_cache(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FISHER_FID_WEIGHTS", raising=False)
    cache = tmp_path / "cache"
    args = [*_inputs(run), "--pairs", "4", "--real-limit", "8", "--fid-weights", str(WEIGHTS),
            "--cache", str(cache), "--batch-size", "4"]
    out = tmp_path / "fid"
    assert cli.main(["evaluate", *args, "--alphas", "0,0.5", "--out", str(out), "--label", "fisher/conv"]) == 0
    res = json.loads((out / "fid.json").read_text())
    assert sorted(res["fid"]) == ["0", "0.5"] and all(math.isfinite(v) and v > 0 for v in res["fid"].values())
    assert res["pairs"] == 4 and res["label"] == "fisher/conv" and res["real"]["count"] == 8
    assert res["weights_id"] == (WEIGHTS.parent / (WEIGHTS.name + ".sha256")).read_text()[:16]
    # MNIST keeps its grey originals, so they are the default reference; recorded everywhere
    manifest = json.loads((out / "manifest.json").read_text())
    assert res["reference"] == res["real"]["reference"] == "grey" == manifest["config"]["reference"] == \
        manifest["reference"]
    assert manifest["stage"] == "evaluate" and manifest["kid"] == res["kid"]
    md = (out / "fid.md").read_text()
    assert "| embedding / decoder | α = 0 | α = 0.5 | N pairs |" in md
    assert f"| fisher/conv | {res['fid']['0']:.2f} | {res['fid']['0.5']:.2f} | 4 |" in md
    assert (out / "fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = list(cache.glob("fid-stats-*.npz"))
    assert len(stats) == 1 and stats[0].name.endswith(f"-test-grey-{res['weights_id']}-8.npz")
    printed = capsys.readouterr().out
    assert "computing real statistics of 8 test images (grey reference" in printed
    from fisher.data import load_prepared
    from fisher.embedding import read_embeddings
    from fisher.evaluation import InterpolationFeatures, frechet, real_features
    from fisher.fid import FIDStats, kid, load_inception
    from fisher.decoders import load_decoder
    from fisher.manipulation import random_pairs
    inception = load_inception(str(WEIGHTS))
    real = FIDStats.load(str(stats[0]))
    assert real.features.shape == (8, 2048) and res["real"]["features_kept"] == 8
    test = load_prepared(run["data"], "test")
    grey_feats = real_features(inception, test["grey"][:8], 256)       # the cache holds the grey images' features
    np.testing.assert_allclose(real.features, grey_feats, rtol=1e-3, atol=1e-4)
    # KID per α is fisher.fid.kid of the decoded interpolations' features against those real features
    ids, z = read_embeddings(run["emb"], "test", "z")
    scorer = InterpolationFeatures(load_decoder(run["decoder"]), inception, z, random_pairs(len(ids), 4, 0),
                                   [0.0, 0.5], 2)
    assert sorted(res["kid"]) == sorted(res["fid"])
    for a, key in enumerate(("0", "0.5")):
        expect = kid(scorer(a * 4 + np.arange(4)), real.features, subsets=100, subset_size=1000, seed=0)
        got = res["kid"][key]
        assert set(got) == {"mean", "std", "stderr", "subsets", "subset_size"}
        assert (got["subsets"], got["subset_size"]) == (100, 4) and math.isfinite(got["mean"])
        assert got["mean"] == pytest.approx(expect["mean"], rel=1e-3, abs=1e-6)
        assert got["stderr"] == pytest.approx(expect["stderr"], rel=1e-3, abs=1e-6)
        assert f"α = {key} FID {res['fid'][key]:.2f} (KID {got['mean'] * 1e3:.3f} ± " in printed     # the result line
        assert f"{got['mean'] * 1e3:.2f} ± {got['stderr'] * 1e3:.2f}" in md
    # the floor: the first 4 train images, grey like the reference, scored against the same real statistics
    floor = res["real_floor"]
    assert (floor["split"], floor["count"], floor["reference"]) == ("train", 4, "grey")
    train = load_prepared(run["data"], "train")
    order = np.argsort(train["id"][:4])
    feats = real_features(inception, train["grey"][:4], 256)[order]
    assert floor["fid"] == pytest.approx(frechet(feats, real)[0], rel=1e-3)
    assert floor["kid"]["mean"] == pytest.approx(kid(feats, real.features)["mean"], rel=1e-3, abs=1e-6)
    assert f"| real train images (floor at this N) | {floor['fid']:.2f} | {floor['fid']:.2f} | 4 |" in md
    assert "KID × 10³" in md and f"| real train images (floor at this N) | {floor['kid']['mean'] * 1e3:.2f}" in md
    mtime = os.stat(stats[0]).st_mtime_ns

    out2 = tmp_path / "fid2"      # other α set, same pairs and cached real statistics (with their features)
    assert cli.main(["evaluate", *args, "--alphas", "0", "--no-floor", "--out", str(out2)]) == 0
    assert "real statistics reused" in capsys.readouterr().out
    assert os.stat(stats[0]).st_mtime_ns == mtime
    res2 = json.loads((out2 / "fid.json").read_text())
    assert res2["label"] == "fisher/conv"                              # default: embedding kind / decoder arch
    assert res2["real_floor"] is None and "floor" not in (out2 / "fid.md").read_text()
    assert res2["fid"]["0"] == pytest.approx(res["fid"]["0"], rel=1e-3)
    assert res2["kid"]["0"]["mean"] == pytest.approx(res["kid"]["0"]["mean"], rel=1e-3, abs=1e-6)
    assert cli.main(["evaluate", *args, "--alphas", "0", "--no-floor", "--out", str(out2)]) == 0   # nothing to do
    assert "nothing to do" in capsys.readouterr().out

    # --reference image: its own cache entry. One left there by an older version (no real features,
    # made-up statistics) is recomputed from the binarized images, not reused and not an error.
    image_cache = cache / stats[0].name.replace("-grey-", "-image-")
    FIDStats(np.zeros(2048), np.eye(2048), 8).save(str(image_cache))
    out3 = tmp_path / "fid3"
    assert cli.main(["evaluate", *args, "--alphas", "0", "--no-floor", "--reference", "image",
                     "--out", str(out3)]) == 0
    printed = capsys.readouterr().out
    assert "computing real statistics of 8 test images (image reference; cached as" in printed
    assert "replacing a cache without the real features KID needs" in printed
    res3 = json.loads((out3 / "fid.json").read_text())
    assert res3["reference"] == "image" and res3["real"]["key"] != res["real"]["key"]
    image_real = FIDStats.load(str(image_cache))
    image_feats = real_features(inception, test["image"][:8], 2)
    np.testing.assert_allclose(image_real.features, image_feats, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(image_real.mu, image_feats.mean(0), rtol=1e-3, atol=1e-4)
    assert abs(res3["fid"]["0"] - res["fid"]["0"]) > 1


def test_evaluate_offline_without_weights(run, tmp_path, capsys, monkeypatch):
    from pytorch_fid import inception as pfi

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(pfi, "load_state_dict_from_url", offline)
    monkeypatch.delenv("FISHER_FID_WEIGHTS", raising=False)
    code = cli.main(["evaluate", *_inputs(run), "--pairs", "2", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--fid-weights" in err and err.startswith("fisher evaluate: error:")
    assert not (tmp_path / "x" / "fid.json").exists()


def test_edit_needs_attributes(run, tmp_path, capsys):
    code = cli.main(["edit", *_inputs(run), "--attribute", "Smiling", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "attributes" in err and err.startswith("fisher edit: error:")


def test_mismatched_inputs_are_refused(run, tmp_path, capsys):
    from fisher.decoders import build_decoder, save_decoder
    other = tmp_path / "dec8"
    save_decoder(build_decoder("conv", 8, (28, 28, 1), 2), str(other))
    args = ["--decoder", str(other), "--embeddings", run["emb"], "--data", run["data"]]
    assert cli.main(["interpolate", *args, "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert "decodes 8-dim embeddings" in err and "dim 16" in err
    assert cli.main(["interpolate", *_inputs(run), "--column", "zz", "--out", str(tmp_path / "i")]) == 2
    assert "no column 'zz'" in capsys.readouterr().err


def test_edit_celeba_attributes(make_celeba, tmp_path, capsys):
    """Tiny generated CelebA (32x32, 5 bits) with stand-in embeddings: one PNG per attribute."""
    from fisher.data import load_prepared
    from fisher.embedding import embedding_table
    from fisher.fid import to_unit_float
    from fisher.images import to_uint8
    from fisher.io import atomic_write_table, manifest_hash, read_manifest, write_manifest
    src, _ = make_celeba(counts={"train": 8, "val": 1, "test": 3}, unlisted=0)
    data, emb, dec = str(tmp_path / "data"), str(tmp_path / "emb"), str(tmp_path / "dec")
    assert cli.main(["prepare", "celeba", "--src", str(src), "--out", data, "--size", "32", "--workers", "1"]) == 0
    manifest = read_manifest(data, "prepare")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        ids = load_prepared(data, split)["id"]
        atomic_write_table(f"{emb}/{split}-00000.parquet",
                           embedding_table(ids, {"z": rng.normal(size=(len(ids), 8)).astype(np.float32)}, {}))
    write_manifest(emb, "embed", {"kind": "fisher"}, inputs={"data": manifest_hash(manifest)},
                   columns={"z": {"dim": 8}}, shards=[f"{s}-00000.parquet" for s in ("train", "val", "test")])
    _fit_and_save(emb, data, dec, 32, [32, 32, 3], 8)
    attrs = load_prepared(data, "train")["attrs"]
    names = [manifest["attr_names"][k] for k in range(40) if 0 < attrs[:, k].sum() < len(attrs)][:2]

    base = ["--decoder", dec, "--embeddings", emb, "--data", data]
    out = tmp_path / "edit"
    assert cli.main(["edit", *base, "--attribute", ",".join(names), "--images", "2", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "edit" and m["config"]["attributes"] == names and m["config"]["scale"] == 3.0
    test = load_prepared(data, "test")
    true = dict(zip(test["id"], to_uint8(to_unit_float(test["image"], 32))))
    for name in names:
        im = np.asarray(Image.open(out / f"edit-{name}.png"))
        assert im.shape == (2 * 34 + 2, 4 * 34 + 2, 3)               # rows = images; true, -, recon, +
        assert np.array_equal(im[2:34, 2:34], true[m["image_ids"][0]])
        assert m["directions"][name]["with"] + m["directions"][name]["without"] == 8
    capsys.readouterr()
    assert cli.main(["edit", *base, "--attribute", "Smiling", "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown Smiling" in err and "Attr_0" in err
