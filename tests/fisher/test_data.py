"""fisher.data: idx reading, binarization, CelebA decoding, shards and the prepare stage."""
from __future__ import annotations

import gzip
import json
import urllib.error

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pathlib import Path

import pytest
from conftest import write_idx
from PIL import Image

from fisher import data
from fisher.io import FisherError

CELEBA_ROWS, CELEBA_COLS = slice(45, 173), slice(25, 153)   # CELEBA_CROP as numpy indices


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- idx

@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = (np.arange(7) - 3).astype(">i4")
    got_images = data.read_idx(write_idx(tmp_path / "img.gz", images, compress))
    got_labels = data.read_idx(write_idx(tmp_path / "lab.gz", labels, compress))
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.dtype == np.int32 and got_labels.tolist() == list(range(-3, 4))


def test_read_idx_rejects_truncated_and_corrupt(tmp_path):
    good = write_idx(tmp_path / "good.gz", np.zeros((5, 28, 28), np.uint8), compress=False).read_bytes()
    (tmp_path / "short.gz").write_bytes(gzip.compress(good[:-100]))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:40])
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x01\x02" + good[2:]))
    for name, expect in [("short.gz", "size mismatch"), ("cut.gz", "gzip"), ("magic.gz", "magic number")]:
        with pytest.raises(FisherError) as err:
            data.read_idx(tmp_path / name)
        message = _one_line(err)
        assert message.startswith(str(tmp_path / name)) and expect in message


# ---------------------------------------------------------------- binarization

def test_binarize_is_chunk_invariant_and_seeded():
    grey = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    whole = data.binarize(grey, seed=3, split="train")
    chunked = np.concatenate([data.binarize(grey[a:b], 3, "train", start_index=a)
                              for a, b in [(0, 7), (7, 8), (8, 31), (31, 50)]])
    assert np.array_equal(whole, chunked)
    assert set(np.unique(whole)) <= {0, 1} and whole.dtype == np.uint8
    assert not np.array_equal(whole, data.binarize(grey, 4, "train"))
    assert not np.array_equal(whole, data.binarize(grey, 3, "test"))
    assert not np.array_equal(whole[1:], data.binarize(grey[1:], 3, "train"))   # index matters
    edges = np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)])
    assert data.binarize(edges, 0, "train").tolist() == edges.astype(bool).astype(np.uint8).tolist()


def test_binarize_mean_matches_grey_level(mnist_dir):
    grey, _ = data.load_mnist_split(str(mnist_dir), "train", limit=5000)
    binary = data.binarize(grey, 0, "train")
    assert abs(binary.mean() - grey.mean() / 255) < 0.002
    mid = (grey > 100) & (grey < 156)          # per-level: P(1) follows the grey value
    assert abs(binary[mid].mean() - grey[mid].mean() / 255) < 0.01


def test_mnist_download_offline_says_pass_src(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(FisherError) as err:
        data.mnist_download(str(tmp_path))
    message = _one_line(err)
    assert "train-images-idx3-ubyte.gz" in message and "--src" in message and "no network" in message


# ---------------------------------------------------------------- CelebA images

def _jpeg(path, array, **kwargs):
    Image.fromarray(array).save(path, quality=kwargs.pop("quality", 95), **kwargs)
    return str(path)


def test_celeba_crop_resize_bits(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8)
    path = _jpeg(tmp_path / "a.jpg", noise)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    crop = decoded[CELEBA_ROWS, CELEBA_COLS]
    assert np.array_equal(data.load_celeba_image(path, size=128, bits=8), crop)
    small = data.load_celeba_image(path, size=32, bits=8).astype(float)
    assert small.shape == (32, 32, 3)
    assert np.abs(small - crop.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))).max() <= 1   # BOX = 4x4 means
    five = data.load_celeba_image(path, size=32, bits=5)
    assert np.array_equal(five, small.astype(np.uint8) >> 3) and five.max() < 32


def test_celeba_known_colour(tmp_path):
    flat = np.empty((218, 178, 3), np.uint8)
    flat[:] = (204, 100, 44)                   # middles of the 5-bit bins 25, 12, 5
    flat[:45] = flat[173:] = 0                 # outside the crop box: black
    flat[:, :25] = flat[:, 153:] = 255
    out = data.load_celeba_image(_jpeg(tmp_path / "c.jpg", flat, quality=100, subsampling=0), size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(np.unique(out[2:-2, 2:-2].reshape(-1, 3), axis=0), [[25, 12, 5]])


def test_celeba_bad_images(tmp_path):
    good = _jpeg(tmp_path / "good.jpg", np.full((218, 178, 3), 128, np.uint8))
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not a jpeg" * 100)
    raw = open(good, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(raw[:len(raw) // 2])
    _jpeg(tmp_path / "small.jpg", np.zeros((100, 120, 3), np.uint8))
    cases = {"corrupt.jpg": "not a readable JPEG", "truncated.jpg": "truncated", "small.jpg": "120x100",
             "missing.jpg": "not found"}
    for name, expect in cases.items():
        with pytest.raises(FisherError) as err:
            data.load_celeba_image(str(tmp_path / name))
        message = _one_line(err)
        assert message.startswith(str(tmp_path / name) + ":") and expect in message and "--skip-bad" in message
    uris = [str(tmp_path / n) for n in ["good.jpg", "corrupt.jpg", "small.jpg", "good.jpg"]]
    images, bad = data.decode_celeba_files(uris, size=32, skip_bad=True)
    assert images.shape == (2, 32, 32, 3) and sorted(bad) == [1, 2]
    with pytest.raises(FisherError, match="corrupt.jpg"):
        data.decode_celeba_files(uris, size=32)


def test_celeba_attr_and_partition_files(make_celeba):
    root, rows = make_celeba(unlisted=3)
    names, attrs = data.read_celeba_attrs(str(root / "list_attr_celeba.txt"))
    assert names == [f"Attr_{k}" for k in range(40)] and len(attrs) == len(rows)
    for name, (split, signs) in rows.items():
        assert attrs[name].dtype == np.int8 and attrs[name].tolist() == ((signs + 1) // 2).tolist()
    assert data.read_celeba_partition(str(root / "list_eval_partition.txt")) == {n: s for n, (s, _) in rows.items()}

    attr_file = root / "list_attr_celeba.txt"
    lines = attr_file.read_bytes().decode().split("\r\n")
    lines[3] = lines[3].rsplit(" ", 1)[0]      # second image row (line 4) loses a column
    attr_file.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(FisherError) as err:
        data.read_celeba_attrs(str(attr_file))
    assert _one_line(err).startswith(f"{attr_file} line 4: expected 41 columns, found 40")
    lines[3] = lines[4].replace(" 1", " 0", 1)
    attr_file.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(FisherError, match=r"line 4: attribute values must be 1 or -1"):
        data.read_celeba_attrs(str(attr_file))


def test_celeba_files_saved_with_a_bom_or_lf_read_the_same(make_celeba):
    """An editor's save: a UTF-8 byte-order mark, LF line ends; the files read as the official ones."""
    root, rows = make_celeba(unlisted=0)
    attr, part = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    want = data.read_celeba_attrs(str(attr)), data.read_celeba_partition(str(part))
    for f in (attr, part):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes().replace(b"\r\n", b"\n"))
    names, attrs = data.read_celeba_attrs(str(attr))
    assert names == want[0][0] and {k: v.tolist() for k, v in attrs.items()} == \
        {k: v.tolist() for k, v in want[0][1].items()}
    assert data.read_celeba_partition(str(part)) == want[1]


# ---------------------------------------------------------------- shards

def test_write_shards_and_decode_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 32, (25, 6, 5, 3), dtype=np.uint8)
    attrs = rng.integers(0, 2, (25, 40), dtype=np.int8)
    ids = [f"{i:06d}" for i in rng.permutation(25)]
    shards = data.write_shards(str(tmp_path), "val", ids, images, attrs, shard_size=10)
    assert [(s["file"], s["rows"]) for s in shards] == [("val-00000.parquet", 10), ("val-00001.parquet", 10),
                                                        ("val-00002.parquet", 5)]
    table = pa.concat_tables([pq.read_table(tmp_path / s["file"]) for s in shards])
    assert table.schema.metadata[b"image_shape"] == b"[6, 5, 3]"
    assert table.schema.names == ["id", "image", "attrs", "split"]
    assert table.schema.types == [pa.string(), pa.binary(), pa.list_(pa.int8(), 40), pa.string()]
    order = np.argsort(ids)
    assert table["id"].to_pylist() == sorted(ids) and set(table["split"].to_pylist()) == {"val"}
    assert np.array_equal(np.stack(table["attrs"].to_numpy(zero_copy_only=False)), attrs[order])
    assert np.array_equal(data.decode_images(table), images[order])
    # offsets of a slice, a batch without metadata, and Ray Data's numpy / pylist dict batches
    sliced = table.slice(13, 6)
    assert np.array_equal(data.decode_images(sliced), images[order][13:19])
    batch = sliced.combine_chunks().to_batches()[0].replace_schema_metadata(None)
    assert np.array_equal(data.decode_images(batch, shape=(6, 5, 3)), images[order][13:19])
    as_numpy = {"image": np.array(sliced["image"].to_pylist(), dtype=object)}
    assert np.array_equal(data.decode_images(as_numpy, shape=[6, 5, 3]), images[order][13:19])
    with pytest.raises(ValueError, match="shape"):
        data.decode_images(batch)

    grey = rng.integers(0, 256, (2, 6, 5, 1), dtype=np.uint8)
    both = data.write_shards(str(tmp_path / "g"), "test", ["b", "a"], images[:2, :, :, :1], np.array([7, 3]),
                             extra_images={"grey": grey})
    table = pq.read_table(tmp_path / "g" / both[0]["file"])
    assert table.schema.names == ["id", "image", "grey", "label", "split"]
    assert np.array_equal(data.decode_images(table, column="grey"), grey[::-1])     # sorted by id with the rest
    assert np.array_equal(data.decode_images(table), images[:2, :, :, :1][::-1])
    with pytest.raises(ValueError, match="shape of images"):
        data.write_shards(str(tmp_path / "g"), "test", ["b", "a"], images[:2, :, :, :1], np.array([7, 3]),
                          extra_images={"grey": grey[:, :5]})
    with pytest.raises(FisherError, match=r"no 'grey' column in the prepared data \(has id, image, attrs, split\)"):
        data.decode_images(sliced, column="grey")

    labels = data.write_shards(str(tmp_path), "test", ["b", "a"], images[:2, :, :, :1], np.array([7, 3]))
    table = pq.read_table(tmp_path / labels[0]["file"])
    assert table["label"].type == pa.int64() and table["label"].to_pylist() == [3, 7]
    assert table.schema.metadata[b"image_shape"] == b"[6, 5, 1]"


# ---------------------------------------------------------------- the prepare stage

def _small_mnist(src):
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 12)):
        img, lab = data.MNIST_FILES[split]
        write_idx(src / img, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(src / lab, rng.integers(0, 10, n).astype(np.uint8))
    return src


def _artifact_files(out):
    """The files of an artifact directory, but the stage's claim (``_plan.json``)."""
    return sorted(p.name for p in out.iterdir() if p.name != "_plan.json") if out.exists() else []


def test_prepare_mnist_reuse_and_config_mismatch(tmp_path):
    src, out = _small_mnist(tmp_path / "src"), tmp_path / "out"
    manifest, reused = data.prepare_mnist(data.MnistConfig(str(src), seed=1, shard_size=8), str(out))
    assert not reused and manifest["counts"] == {"train": 30, "test": 12} and manifest["levels"] == 2
    assert manifest["image_shape"] == [28, 28, 1] and len(manifest["shards"]) == 4 + 2
    loaded = data.load_prepared(str(out), "train")
    assert loaded["image"].shape == (30, 28, 28, 1) and loaded["id"][0] == "train-00000"
    grey = data.load_mnist_split(str(src), "train")[0]
    expected = data.binarize(grey, 1, "train")
    assert np.array_equal(loaded["image"][..., 0], expected)
    # the grey originals are kept beside the binarized images, with their levels in the manifest
    assert np.array_equal(loaded["grey"][..., 0], grey) and loaded["grey"].dtype == np.uint8
    assert manifest["references"] == {"image": 2, "grey": 256} and data.data_references(manifest) == manifest["references"]
    assert manifest["columns"] == ["id", "image", "grey", "label", "split"]
    assert pq.read_table(out / "train-00000.parquet").schema.names == manifest["columns"]
    assert data.reference_column(manifest, None, "d") == ("grey", 256)
    assert data.reference_column(manifest, "image", "d") == ("image", 2)
    old = {k: v for k, v in manifest.items() if k != "references"}       # prepared before grey was kept
    assert data.data_references(old) == {"image": 2} and data.reference_column(old, None, "d") == ("image", 2)
    with pytest.raises(FisherError, match=r"^--reference grey: d has no 'grey' column, only image \(2 levels\) "
                                          r"\(MNIST prepared before .*\); pass --reference image$"):
        data.reference_column(old, "grey", "d")
    assert data.prepare_mnist(data.MnistConfig(str(src), seed=1, shard_size=8), str(out))[1] is True
    with pytest.raises(FisherError, match=r"different config \(seed: 1 there, 2 now\)"):
        data.prepare_mnist(data.MnistConfig(str(src), seed=2, shard_size=8), str(out))


def test_prepare_interrupted_then_rerun_keeps_finished_shards(tmp_path, monkeypatch):
    """A run that dies after 3 shards (disk full) leaves no manifest and no temporary file; the
    rerun keeps those 3 shards, writes only the rest, and the result is a clean run's bytes."""
    src = _small_mnist(tmp_path / "src")
    out, clean, written = tmp_path / "out", tmp_path / "clean", []

    def flaky(uri, table):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(uri)
        real_write(uri, table)
    real_write = data.atomic_write_table
    monkeypatch.setattr(data, "atomic_write_table", flaky)
    cfg = data.MnistConfig(str(src), shard_size=8)
    with pytest.raises(OSError, match="disk full"):
        data.prepare_mnist(cfg, str(out))
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(kept) == sorted(["_plan.json", *(Path(u).name for u in written)]) and len(kept) == 4  # the claim, no temp

    written.clear()
    monkeypatch.setattr(data, "atomic_write_table", real_write)
    logged = []
    manifest, reused = data._prepare(str(out), cfg, lambda: data._mnist_source(cfg), log=logged.append)
    assert not reused and logged == [f"prepare: 3 of {len(manifest['shards'])} shards already done"]
    assert all(((out / name).stat().st_mtime_ns == t) for name, t in kept.items())          # not rewritten
    data.prepare_mnist(cfg, str(clean))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in clean.iterdir()}


def test_prepare_rerun_rewrites_shards_of_another_config_or_damaged(tmp_path):
    src = _small_mnist(tmp_path / "src")
    out, clean = tmp_path / "out", tmp_path / "clean"
    data.prepare_mnist(data.MnistConfig(str(src), seed=5, shard_size=8), str(out))
    (out / "manifest.json").unlink()                       # an interrupted run of another seed
    (out / "train-00099.parquet").write_bytes(b"a stray shard")   # named like a shard, not written by prepare
    cfg = data.MnistConfig(str(src), seed=0, shard_size=8)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FisherError, match=r"train-00099\.parquet: not a shard written by `fisher prepare`"):
        data.prepare_mnist(cfg, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # nothing deleted, nothing written
    (out / "train-00099.parquet").unlink()
    data.prepare_mnist(cfg, str(out))                      # the other seed's own shards are replaced
    data.prepare_mnist(cfg, str(clean))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in clean.iterdir()}


def test_prepare_rerun_rewrites_shards_without_the_grey_column(tmp_path):
    """An interrupted run of the same config from before MNIST kept its grey originals left shards without
    ``grey``: they are not taken as finished, so the rerun's artifact is a clean run's bytes."""
    src = _small_mnist(tmp_path / "src")
    out, clean = tmp_path / "out", tmp_path / "clean"
    cfg = data.MnistConfig(str(src), shard_size=8)
    data.prepare_mnist(cfg, str(out))
    (out / "manifest.json").unlink()
    shard = out / "test-00001.parquet"
    table = pq.read_table(shard)
    old = table.drop_columns(["grey"]).replace_schema_metadata(table.schema.metadata)    # same config bytes
    pq.write_table(old, shard)
    config = json.loads(json.dumps(cfg.to_dict()))
    columns = ["id", "image", "grey", "label", "split"]
    assert data._finished(str(out), config, data._Job("test", 1, 8, 12), columns) is None
    assert data._finished(str(out), config, data._Job("test", 0, 0, 8), columns) == (8, [])
    data.prepare_mnist(cfg, str(out))
    data.prepare_mnist(cfg, str(clean))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in clean.iterdir()}
    assert "grey" in pq.read_table(shard).column_names


def test_prepare_celeba_rerun_decodes_only_unfinished_shards(tmp_path, make_celeba):
    """Shards are cut by input position, so a bad image skipped in a finished shard stays counted
    and a rerun decodes only the images of the shards that were not written."""
    root, _ = make_celeba(counts={"train": 7, "val": 2, "test": 3}, unlisted=0)
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"garbage")
    cfg = data.CelebaConfig(str(root), size=8, shard_size=3, skip_bad=True)
    decoded = []

    def mapper(fn, chunks):                   # dies after the first two chunks (= shards at size 3)
        for i, chunk in enumerate(chunks):
            if fail and i == 2:
                raise RuntimeError("killed")
            decoded.extend(chunk)
            yield fn(chunk)
    out, clean = tmp_path / "out", tmp_path / "clean"
    fail = True
    with pytest.raises(RuntimeError, match="killed"):
        data.prepare_celeba(cfg, str(out), mapper=mapper)
    assert _artifact_files(out) == ["train-00000.parquet", "train-00001.parquet"]
    fail, decoded[:] = False, []
    manifest, _ = data.prepare_celeba(cfg, str(out), mapper=mapper)
    assert len(decoded) == 12 - 6                                  # the first 6 train images were not decoded again
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["first"][0]["name"] == "000002.jpg"
    assert manifest["counts"] == {"train": 6, "val": 2, "test": 3}
    assert [s["rows"] for s in manifest["shards"]] == [2, 3, 1, 2, 3]     # by input: 3 + 3 + 1 train images
    data.prepare_celeba(cfg, str(clean))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in clean.iterdir()}


def test_prepare_celeba_skip_bad_and_missing_rows(tmp_path, make_celeba):
    root, rows = make_celeba(counts={"train": 4, "val": 2, "test": 3})
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"garbage")
    Image.new("RGB", (64, 64)).save(root / "img_align_celeba" / "000006.jpg")          # a val image
    out = tmp_path / "out"
    with pytest.raises(FisherError, match="000002.jpg: not a readable JPEG"):
        data.prepare_celeba(data.CelebaConfig(str(root), size=16), str(out))
    assert _artifact_files(out) == []
    manifest, _ = data.prepare_celeba(data.CelebaConfig(str(root), size=16, skip_bad=True), str(out))
    assert manifest["counts"] == {"train": 3, "val": 1, "test": 3} and manifest["levels"] == 32
    assert manifest["skipped"]["count"] == 2
    assert [b["name"] for b in manifest["skipped"]["first"]] == ["000002.jpg", "000006.jpg"]
    assert manifest["attr_names"][0] == "Attr_0" and manifest["config"]["crop"] == [25, 45, 153, 173]
    val = data.load_prepared(str(out), "val")
    assert val["id"].tolist() == ["000005"] and val["image"].shape == (1, 16, 16, 3)
    assert val["attrs"][0].tolist() == ((rows["000005.jpg"][1] + 1) // 2).tolist()
    assert json.loads((out / "manifest.json").read_text())["image_shape"] == [16, 16, 3]

    Image.new("RGB", (178, 218)).save(root / "img_align_celeba" / "999999.jpg")      # in no list file
    with pytest.raises(FisherError, match="999999.jpg: no row for 999999.jpg in .*list_eval_partition.txt"):
        data.prepare_celeba(data.CelebaConfig(str(root), size=16), str(tmp_path / "out2"))
