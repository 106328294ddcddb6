"""``fisher prepare`` run in-process through raycluster.cli.main."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA
from PIL import Image

from fisher import data
from raycluster import cli


@pytest.fixture(autouse=True)
def only_prepare(monkeypatch):
    """Build the parser from the prepare stage alone, so these tests do not depend on other stages."""
    monkeypatch.setattr(cli, "STAGES", ("prepare",))


def _digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def _read_split(out, split):
    manifest = json.loads((out / "manifest.json").read_text())
    files = [out / s["file"] for s in manifest["shards"] if s["split"] == split]
    return manifest, pa.concat_tables([pq.read_table(f) for f in files])


def _fails(capsys, argv, *expected):
    """The command exits 2 and, apart from progress-bar updates, prints one error line to stderr."""
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith("decoding JPEGs")]
    assert len(lines) == 1 and lines[0].startswith("fisher prepare: error: ")
    err = lines[0]
    for text in expected:
        assert text in err
    return err


def test_mnist_full(tmp_path, mnist_dir, capsys):
    out = tmp_path / "mnist"
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = {split: len(data.read_idx(mnist_dir / labels)) for split, (_, labels) in data.MNIST_FILES.items()}
    if mnist_dir == SHARED_DATA / "mnist":
        assert counts == {"train": 60000, "test": 10000}
    assert manifest["stage"] == "prepare" and manifest["counts"] == counts
    assert manifest["image_shape"] == [28, 28, 1] and manifest["levels"] == 2 and manifest["config"]["seed"] == 0
    assert manifest["references"] == {"image": 2, "grey": 256}
    for split, n in counts.items():
        _, table = _read_split(out, split)
        images = data.decode_images(table)
        # the grey column holds the idx file's pixels; the binarized image is Bernoulli(grey/255) as before
        grey = data.read_idx(mnist_dir / data.MNIST_FILES[split][0])
        assert np.array_equal(data.decode_images(table, column="grey")[..., 0], grey)
        assert np.array_equal(images[..., 0], data.binarize(grey, 0, split))
        ids = table["id"].to_pylist()
        assert images.shape == (n, 28, 28, 1) and set(np.unique(images)) == {0, 1}
        assert len(set(ids)) == n and ids == sorted(ids) and ids[0] == f"{split}-00000"
        labels = table["label"].to_numpy()
        assert labels.min() == 0 and labels.max() == 9
        assert np.array_equal(labels, data.read_idx(mnist_dir / data.MNIST_FILES[split][1]))
    capsys.readouterr()

    before = _digests(out)
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", str(out)]) == 0
    assert "already prepared" in capsys.readouterr().out and _digests(out) == before
    (out / "manifest.json").unlink()                        # as if killed before the manifest: redo, same bytes
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", str(out)]) == 0
    after = _digests(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def test_mnist_limit_shards_and_config_change(tmp_path, mnist_dir, capsys):
    out = tmp_path / "small"
    argv = ["prepare", "mnist", "--src", str(mnist_dir), "--out", str(out), "--limit", "50", "--shard-size", "20"]
    assert cli.main(argv + ["--seed", "5"]) == 0
    manifest, table = _read_split(out, "test")
    assert manifest["counts"] == {"train": 50, "test": 50} and manifest["config"]["limit"] == 50
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{s}-{k:05d}.parquet" for s in ("test", "train")
                                                             for k in range(3)]
    grey = data.read_idx(mnist_dir / data.MNIST_FILES["test"][0])[:50]
    assert np.array_equal(data.decode_images(table)[..., 0], data.binarize(grey, 5, "test"))
    _fails(capsys, argv + ["--seed", "6"], "different config", "seed: 5 there, 6 now")
    assert cli.main(argv + ["--seed", "5"]) == 0 and "note:" not in capsys.readouterr().out
    del manifest["references"]                           # as prepared before MNIST kept its grey originals
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(argv + ["--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "already prepared" in printed and "prepared before MNIST kept its grey originals" in printed
    assert "--reference image" in printed and "grey" not in data.data_references(json.loads((out / "manifest.json").read_text()))


def test_mnist_bad_inputs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _fails(capsys, ["prepare", "mnist", "--src", str(tmp_path), "--out", str(out)],
           f"{tmp_path}/train-images-idx3-ubyte.gz: file not found", "--src")
    _fails(capsys, ["prepare", "mnist", "--src", str(tmp_path), "--out", str(out), "--size", "32", "--skip-bad"],
           "--size, --skip-bad: not used for mnist")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    _fails(capsys, ["prepare", "mnist", "--out", str(out)], f"{out}/raw/train-images-idx3-ubyte.gz", "--src")
    assert not list(out.rglob("*.parquet")) and not (out / "manifest.json").exists()


def test_celeba_real(tmp_path, celeba_real, capsys):
    out = tmp_path / "celeba32"
    assert cli.main(["prepare", "celeba", "--src", str(celeba_real), "--out", str(out), "--size", "32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 4657, "val": 780, "test": 660}
    assert manifest["image_shape"] == [32, 32, 3] and manifest["levels"] == 32
    assert manifest["references"] == {"image": 32} and "grey" not in manifest["columns"]
    assert manifest["config"]["crop"] == [25, 45, 153, 173] and manifest["skipped"]["count"] == 0
    assert manifest["attr_names"][:2] == ["5_o_Clock_Shadow", "Arched_Eyebrows"] and len(manifest["attr_names"]) == 40
    _, train = _read_split(out, "train")
    images = data.decode_images(train)
    assert images.shape == (4657, 32, 32, 3) and images.max() == 31 and images.min() == 0
    assert train["id"][0].as_py() == "000001"
    # 000001.jpg row of list_attr_celeba.txt: -1 1 1 -1 ...  → 0 1 1 0 ...
    assert train["attrs"][0].as_py()[:4] == [0, 1, 1, 0]
    assert np.array_equal(images[0], data.load_celeba_image(str(celeba_real / "img_align_celeba/000001.jpg"), 32))
    assert "prepared celeba (train 4657, val 780, test 660" in capsys.readouterr().out


def test_celeba_bad_input_leaves_nothing(tmp_path, make_celeba, capsys):
    root, _ = make_celeba(counts={"train": 3, "val": 1, "test": 1})
    Image.new("RGB", (218, 178)).save(root / "img_align_celeba" / "000003.jpg")        # rotated: 218x178
    out = tmp_path / "out"
    argv = ["prepare", "celeba", "--src", str(root), "--out", str(out), "--size", "16", "--workers", "2"]
    _fails(capsys, argv, "000003.jpg: image is 218x178, expected 178x218", "--skip-bad")
    assert not out.exists() or not any(out.iterdir())
    assert cli.main(argv + ["--skip-bad"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 1} and manifest["skipped"]["count"] == 1
    assert "1 bad images skipped" in capsys.readouterr().out
    _fails(capsys, ["prepare", "celeba", "--out", str(out)], "--src")
    _fails(capsys, argv + ["--seed", "1"], "--seed: not used for celeba")
