"""The bad-input corpus (issue "Running on real clusters": bad input and security).

Each case derives one bad input from copies of good artifacts built once for the module (a 64-image
MNIST slice, a 1-layer 8-filter prior, 16-dim Fisher embeddings, a 1-epoch conv decoder) or from a
tiny generated CelebA folder, runs the ``fisher`` command in-process and checks:

* the exit status is 2;
* stderr ends with exactly one ``fisher <command>: error: ...`` line, the only such line, matching the
  case's pattern (which names the bad file or option and what to do about it);
* stderr holds no Python traceback (the one case that fails inside a Ray task is allowed Ray's own log
  lines, which carry Ray Data's internal traceback, but no frame of this project's code);
* nothing in ``--out`` looks finished: no ``manifest.json``, no weights, images or FID results, no
  temporary files, no bare ``_plan.json`` claim with no work after it; an ``--out`` that existed before
  (a rerun) is left byte-for-byte unchanged;
* a pickle carrying code (where weights are expected) is refused without running it.

Tests run as root here, where ``chmod 000`` does not stop reads, so the "unreadable path" cases use a
file where a directory is expected and a directory where a file is expected instead.

Almost every case fails before Ray starts; the corrupt-Parquet embed case runs on the module's Ray.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MNIST_NAMES, write_idx
from PIL import Image

from raycluster import cli

N = 64                      # images per split of the good data
Z_DIM = 16
FINISHED = ("manifest.json", "weights.pt", "module.json", "fid.json", "fid.md",
            "interpolations.png", "report.md")      # files that mark --out as a finished artifact


# ---------------------------------------------------------------- good artifacts, built once

@pytest.fixture(scope="module")
def good(tmp_path_factory, mnist_dir) -> dict[str, Path]:
    import ray
    root = tmp_path_factory.mktemp("good")
    p = {k: root / k for k in ("data", "prior", "emb", "dec")}
    p["mnist"] = Path(mnist_dir)
    if not ray.is_initialized():        # one local Ray for the module, on loopback only; the stages join it
        from raycluster.runtime import loopback_only
        loopback_only()
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    steps = [
        ["prepare", "mnist", "--src", str(mnist_dir), "--out", str(p["data"]), "--limit", str(N),
         "--shard-size", str(N)],
        ["train-prior", "--data", str(p["data"]), "--out", str(p["prior"]), "--epochs", "1", "--layers", "1",
         "--filters", "8", "--batch-size", "32", "--cpus-per-worker", "0.5"],
        ["embed", "--prior", str(p["prior"]), "--data", str(p["data"]), "--out", str(p["emb"]),
         "--dim", str(Z_DIM), "--cpus-per-actor", "0.5"],
        ["train-decoder", "--embeddings", str(p["emb"]), "--data", str(p["data"]), "--out", str(p["dec"]),
         "--epochs", "1", "--batch-size", "32", "--cpus-per-worker", "0.5"],
    ]
    for argv in steps:
        assert cli.main(argv) == 0, argv
    yield p
    ray.shutdown()


@dataclass
class Ctx:
    """What a case builder gets: the good artifacts (read-only), its own tmp dir and helpers."""
    good: dict
    tmp: Path
    make_celeba: object
    paths: dict = field(default_factory=dict)     # placeholder → path, filled with good values and overrides

    def copy(self, name: str, as_name: str | None = None) -> Path:
        dst = self.tmp / (as_name or f"{name}-copy")
        shutil.copytree(self.good[name], dst)
        return dst


# ---------------------------------------------------------------- builders of bad inputs

def _celeba(c: Ctx) -> Path:
    root, _ = c.make_celeba(counts={"train": 5, "val": 2, "test": 2}, unlisted=0, root=c.tmp / "celeba")
    return root


def celeba_raw(c):
    return {"celeba": _celeba(c)}


def jpeg_corrupt(c):
    root = _celeba(c)
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    return {"celeba": root}


def jpeg_truncated(c):
    root = _celeba(c)
    f = root / "img_align_celeba" / "000003.jpg"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 5])
    return {"celeba": root}


def jpeg_wrong_size(c):
    root = _celeba(c)
    Image.new("RGB", (100, 120), (90, 40, 20)).save(root / "img_align_celeba" / "000004.jpg")
    return {"celeba": root}


def attr_wrong_columns(c):
    root = _celeba(c)
    f = root / "list_attr_celeba.txt"
    lines = f.read_bytes().decode().split("\r\n")
    assert lines[6].startswith("000005.jpg ")              # line 7 of the file
    lines[6] = lines[6].rsplit(" ", 1)[0].rstrip()          # drop the last attribute: 40 columns
    f.write_bytes("\r\n".join(lines).encode())
    return {"celeba": root}


def _mnist_links(c, skip=()) -> Path:
    src = c.tmp / "mnist"
    src.mkdir()
    for name in (n for pair in MNIST_NAMES.values() for n in pair):
        if name not in skip:
            (src / name).symlink_to(c.good["mnist"] / name)
    return src


def mnist_missing_file(c):
    return {"src": _mnist_links(c, skip=("t10k-labels-idx1-ubyte.gz",))}


def mnist_empty(c):
    src = _mnist_links(c, skip=MNIST_NAMES["train"])
    write_idx(src / MNIST_NAMES["train"][0], np.zeros((0, 28, 28), np.uint8))
    write_idx(src / MNIST_NAMES["train"][1], np.zeros(0, np.uint8))
    return {"src": src}


def src_is_file(c):
    f = c.tmp / "mnist.tar.gz"
    f.write_bytes(gzip.compress(b"not a folder"))
    return {"src": f}


def out_is_file(c):
    (c.tmp / "out").write_text("an existing file\n")
    return {}


def data_is_file(c):
    return {"data": c.good["data"] / "train-00000.parquet"}


def data_parquet_truncated(c):
    d = c.copy("data")
    f = d / "train-00000.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return {"data": d}


def data_shard_replaced(c):
    d = c.copy("data")
    t = pq.read_table(d / "test-00000.parquet")
    pq.write_table(t.slice(0, 10), d / "test-00000.parquet")
    return {"data": d}


def data_parquet_corrupt(c):
    """Zeros over the compressed image pages: the footer is intact, so this only fails when read (on Ray)."""
    d = c.copy("data")
    f = d / "test-00000.parquet"
    meta = pq.ParquetFile(f).metadata.row_group(0)
    image = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "image")
    start = image.dictionary_page_offset or image.data_page_offset
    raw = bytearray(f.read_bytes())
    raw[start + 200:start + 264] = bytes(64)
    f.write_bytes(bytes(raw))
    with pytest.raises(OSError):
        pq.read_table(f)                                      # really corrupt
    return {"data": d}


def data_manifest_corrupt(c):
    d = c.copy("data")
    m = d / "manifest.json"
    m.write_bytes(m.read_bytes()[:100])
    return {"data": d}


def _edit_state(directory: Path, fn) -> None:
    f = directory / "weights.pt"
    state = torch.load(f, weights_only=True)
    fn(state)
    torch.save(state, f)


def _poisoned(key: str, value: float):
    """A builder: a copy of the ``key`` checkpoint with ``value`` in its first float weight."""
    def build(c):
        def poison(state):
            name = next(k for k, v in state.items() if v.is_floating_point())
            state[name].view(-1)[0] = value
        d = c.copy(key)
        _edit_state(d, poison)
        return {key: d}
    return build


def prior_wrong_arch(c):
    d = c.copy("prior")
    cfg = json.loads((d / "module.json").read_text())
    cfg["config"]["n_layers"] = 5                             # the weights hold 1 layer
    (d / "module.json").write_text(json.dumps(cfg))
    return {"prior": d}


class _RunsCode:
    """Pickles to ``os.system("touch <marker>")``: code that runs on a plain ``pickle.load``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_pickle(c, directory: Path) -> None:
    control = c.tmp / "control-ran"
    torch.save(_RunsCode(control), c.tmp / "control.pt")
    torch.load(c.tmp / "control.pt", weights_only=False)     # the payload is live: unsafe loading runs it
    assert control.exists()
    torch.save(_RunsCode(c.tmp / "payload-ran"), directory / "weights.pt")


def _pickled(key: str):
    """A builder: a copy of the ``key`` checkpoint whose weights.pt is a live code-running pickle."""
    def build(c):
        d = c.copy(key)
        _plant_pickle(c, d)
        return {key: d}
    return build


def prior_weights_is_dir(c):
    d = c.copy("prior")
    (d / "weights.pt").unlink()
    (d / "weights.pt").mkdir()
    return {"prior": d}


def _rewrite_shard(f: Path, meta_update=None, z_update=None) -> None:
    from fisher.embedding import column_array, embedding_table
    from fisher.io import atomic_write_table
    t = pq.read_table(f)
    meta = {**json.loads(t.schema.metadata[b"fisher"]), **(meta_update or {})}
    z = column_array(t["z"]).copy()
    if z_update:
        z_update(z)
    atomic_write_table(str(f), embedding_table(np.asarray(t["id"].to_pylist()), {"z": z}, meta))


def emb_mixed_seed(c):
    d = c.copy("emb")
    _rewrite_shard(d / "test-00000.parquet", meta_update={"seed": 1})
    return {"emb": d}


def emb_mixed_seed_rerun(c):
    """An interrupted embed (no manifest yet) into which a shard of a seed-1 run was copied; rerun."""
    d = c.copy("emb", "out")
    (d / "manifest.json").unlink()
    _rewrite_shard(d / "test-00000.parquet", meta_update={"seed": 1})
    return {}


def emb_nan(c):
    d = c.copy("emb")
    _rewrite_shard(d / "train-00000.parquet", z_update=lambda z: z.__setitem__((3, 0), np.nan))
    return {"emb": d}


def emb_inf(c):
    d = c.copy("emb")
    _rewrite_shard(d / "test-00000.parquet", z_update=lambda z: z.__setitem__((5, 2), np.inf))
    return {"emb": d}


def emb_other_prior(c):
    """The same embedding directory as if made with another prior (its manifest names another prior)."""
    d = c.copy("emb")
    m = json.loads((d / "manifest.json").read_text())
    m["config"]["prior"] = m["inputs"]["prior"] = "0123456789abcdef"
    (d / "manifest.json").write_text(json.dumps(m))
    return {"emb": d}


def emb_other_prior_resume(c):
    c.copy("dec", "out")                                      # continue the good decoder's --out
    return emb_other_prior(c)


def data_without_grey(c):
    """Prepared MNIST from before the grey originals were kept: no ``references``, no ``grey`` column."""
    d = c.copy("data")
    m = json.loads((d / "manifest.json").read_text())
    del m["references"]
    m["columns"] = [col for col in m["columns"] if col != "grey"]
    (d / "manifest.json").write_text(json.dumps(m))
    for shard in d.glob("*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.drop_columns(["grey"]).replace_schema_metadata(table.schema.metadata), shard)
    return {"data": d}


def data_other(c):
    d = c.copy("data")
    m = json.loads((d / "manifest.json").read_text())
    m["config"]["seed"] = 7                                   # another binarization of MNIST
    (d / "manifest.json").write_text(json.dumps(m))
    return {"data": d}


def dec_zdim(c):
    from fisher.decoders import build_decoder, save_decoder
    d = c.tmp / "dec8"
    save_decoder(build_decoder("conv", 8, (28, 28, 1), 2), str(d))
    return {"dec": d}


def dec_weights_zdim(c):
    """module.json says z_dim 16, weights.pt holds an 8-dim decoder."""
    from fisher.decoders import build_decoder
    d = c.copy("dec")
    torch.save(build_decoder("conv", 8, (28, 28, 1), 2).state_dict(), d / "weights.pt")
    return {"dec": d}


def prior_pixelvae(c):
    """A PixelVAE checkpoint (a latent-variable model: its log_prob is the ELBO) where --prior is expected."""
    from fisher.priors import build_prior, save_prior
    d = c.copy("prior")
    save_prior(build_prior("pixelvae", latent_dim=2, pixel_layers=1, filters=4), d)
    return {"prior": d}


def _wgan(c, z_dim: int = Z_DIM) -> Path:
    """A small WGAN-GP decoder checkpoint for the good data (28x28 binary images)."""
    from fisher.decoders import build_decoder, save_decoder
    d = c.tmp / f"wgan{z_dim}"
    save_decoder(build_decoder("wgan", z_dim, (28, 28, 1), 2, width=4, noise_dim=4), str(d))
    return d


def dec_wgan_nan_critic(c):
    """A WGAN-GP checkpoint with NaN in a weight of its critic."""
    d = _wgan(c)
    _edit_state(d, lambda state: state["critic.layers.1.0.weight"].view(-1).__setitem__(0, float("nan")))
    return {"dec": d}


def dec_weights_of_another_kind(c):
    """module.json of the conv decoder beside the weights of a WGAN-GP decoder for the same embeddings."""
    d = c.copy("dec")
    (d / "weights.pt").write_bytes((_wgan(c) / "weights.pt").read_bytes())
    return {"dec": d}


def out_foreign(c):
    """--out is a user's directory: a file no stage wrote."""
    (c.tmp / "out").mkdir()
    (c.tmp / "out" / "notes.txt").write_text("my notes\n")
    return {}


def _out_copy_of(key: str):
    """A builder: --out is a copy of the good ``key`` artifact (another stage's output)."""
    def build(c):
        c.copy(key, "out")
        return {}
    return build


def out_interrupted_embed(c):
    """--out holds an interrupted embed: shards named like prepare's, its _plan.json, no manifest."""
    d = c.copy("emb", "out")
    (d / "manifest.json").unlink()
    return {}


def out_prepare_foreign_shard(c):
    """An interrupted prepare (no manifest) into which an embedding shard of the same name was copied:
    prepare would delete it as a leftover of its own."""
    d = c.copy("data", "out")
    (d / "manifest.json").unlink()
    shutil.copy(c.good["emb"] / "test-00000.parquet", d / "test-00000.parquet")
    return {}


def fid_weights_text(c):
    f = c.tmp / "inception.pth"
    f.write_text("these are not weights\n")
    return {"fid": f}


def fid_weights_nan(c):
    """FID Inception weights with the right keys and shapes, one NaN."""
    from fisher.fid import fid_inception_arch
    sd = fid_inception_arch().state_dict()
    sd["Mixed_7c.branch_pool.conv.weight"].view(-1)[0] = float("nan")
    torch.save(sd, c.tmp / "inception.pth")
    return {"fid": c.tmp / "inception.pth"}


def _edit_json(key: str, name: str, fn):
    """A builder: a copy of the good ``key`` artifact whose JSON file ``name`` is replaced by ``fn(old)``."""
    def build(c):
        d = c.copy(key)
        f = d / name
        f.write_text(json.dumps(fn(json.loads(f.read_text()))))
        return {key: d}
    return build


def _set(path: str, value):
    def fn(obj):
        *head, last = path.split(".")
        target = obj
        for k in head:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
        return obj
    return fn


_DELETE = object()


def _preset(content: bytes):
    def build(c):
        f = c.tmp / "preset.json"
        f.write_bytes(content)
        return {"preset": f}
    return build


def _small_preset(drop=(), **changes) -> bytes:
    from raycluster.run import PRESETS
    preset = json.loads((PRESETS / "mnist-small.json").read_text())
    preset.update(changes)
    for key in drop:
        del preset[key]
    return json.dumps(preset).encode()


def src_not_utf8(c):
    d = Path(os.fsdecode(bytes(c.tmp) + b"/mnist-\xff"))
    d.mkdir()
    return {"src": d}


def shard_without_image(c):
    d = c.copy("data")
    f = d / "train-00000.parquet"
    t = pq.read_table(f)
    pq.write_table(t.drop_columns(["image"]).replace_schema_metadata(t.schema.metadata), f)
    return {"data": d}


def _celeba_duplicate(name: str, line: int):
    """A builder: the CelebA folder whose ``name`` file lists the image of ``line`` again, with other values."""
    def build(c):
        root = _celeba(c)
        f = root / name
        lines = f.read_bytes().decode().split("\r\n")
        row = lines[line - 1].split(" ")
        row[-1] = {"1": "-1", "-1": "1", "0": "2"}.get(row[-1], "0")
        lines.append(" ".join(row))
        if name == "list_attr_celeba.txt":
            lines = [l for l in lines if l]
            lines[0] = str(len(lines) - 2)
        f.write_bytes("\r\n".join(lines).encode())
        return {"celeba": root}
    return build


def mnist_endless(c):
    """The training images file is a link to an endless device."""
    src = _mnist_links(c, skip=(MNIST_NAMES["train"][0],))
    (src / MNIST_NAMES["train"][0]).symlink_to("/dev/zero")
    return {"src": src}


def mnist_gzip_bomb(c):
    """190 KB of gzip that declares 100 images and inflates to 200 MB."""
    src = _mnist_links(c, skip=(MNIST_NAMES["train"][0],))
    header = bytes([0, 0, 8, 3]) + np.asarray([100, 28, 28], ">u4").tobytes()
    (src / MNIST_NAMES["train"][0]).write_bytes(gzip.compress(header + bytes(200_000_000), 9))
    return {"src": src}


def emb_duplicate_ids(c):
    """An embedding shard copied over another: the same ids in two shards."""
    d = c.copy("emb")
    shutil.copy(d / "train-00000.parquet", d / "test-00000.parquet")
    return {"emb": d}


def emb_short_vectors(c):
    """An embedding shard whose vectors are 8 long where the manifest (and the decoder) say 16."""
    from fisher.embedding import column_array, embedding_table
    from fisher.io import atomic_write_table
    d = c.copy("emb")
    f = d / "test-00000.parquet"
    t = pq.read_table(f)
    atomic_write_table(str(f), embedding_table(np.asarray(t["id"].to_pylist()), {"z": column_array(t["z"])[:, :8]},
                                               json.loads(t.schema.metadata[b"fisher"])))
    return {"emb": d}


def data_copy(c):
    return {"data": c.copy("data")}


def out_newline_file(c):
    (c.tmp / "a\nb").write_text("a file whose name holds a newline\n")
    return {}


def cache_is_file(c):
    (c.tmp / "fid-cache").write_text("not a directory\n")
    return {"cache": c.tmp / "fid-cache"}


# ---------------------------------------------------------------- the corpus

PRIOR = ["--prior", "{prior}", "--data", "{data}", "--out", "{out}"]
DECODE = ["train-decoder", "--embeddings", "{emb}", "--data", "{data}", "--out", "{out}", "--epochs", "1",
          "--batch-size", "32"]
INPUTS = ["--decoder", "{dec}", "--embeddings", "{emb}", "--data", "{data}", "--out", "{out}"]
CELEBA = ["prepare", "celeba", "--src", "{celeba}", "--out", "{out}", "--size", "32", "--workers", "1"]
MNIST = ["prepare", "mnist", "--src", "{src}", "--out", "{out}", "--limit", "8"]
TRAIN = ["train-prior", "--data", "{data}", "--out", "{out}", "--epochs", "1", "--layers", "1", "--filters", "8"]
PARQUET_FIX = r"rerun `fisher prepare` for "

CASES = [
    # id, builder (bad input in tmp_path), argv, pattern the error line must match
    ("jpeg-corrupt", jpeg_corrupt, CELEBA,
     r"000002\.jpg: not a readable JPEG \(.+\); replace the file or pass --skip-bad"),
    ("jpeg-truncated", jpeg_truncated, CELEBA,
     r"000003\.jpg: not a readable JPEG \(image file is truncated.*\); replace the file or pass --skip-bad"),
    ("jpeg-wrong-size", jpeg_wrong_size, CELEBA,
     r"000004\.jpg: image is 100x120, expected 178x218 .*pass --skip-bad"),
    ("attr-wrong-columns", attr_wrong_columns, CELEBA,
     r"list_attr_celeba\.txt line 7: expected 41 columns, found 40; use the official CelebA file"),
    ("mnist-missing-file", mnist_missing_file, MNIST,
     r"t10k-labels-idx1-ubyte\.gz: file not found; pass --src with a directory holding the four MNIST"),
    ("mnist-empty", mnist_empty, MNIST,
     r"train-images-idx3-ubyte\.gz: holds 0 images, an empty dataset; pass --src"),
    ("prepare-limit-0", None, [*MNIST[:-1], "0"], r"--limit 0: must be >= 1"),
    ("src-is-a-file", src_is_file, MNIST,
     r"mnist\.tar\.gz/train-images-idx3-ubyte\.gz: cannot be read \(.*Not a directory\); pass --src with a "
     r"directory"),
    ("out-is-a-file", out_is_file, MNIST,
     r"--out .*/out: exists and is not a directory; pass a new directory path"),
    ("data-is-a-file", data_is_file, TRAIN,
     r"train-00000\.parquet: no manifest\.json; this is not a 'prepare' artifact \(run `fisher prepare`"),
    ("data-manifest-corrupt", data_manifest_corrupt, TRAIN,
     r"data-copy/manifest\.json: corrupt manifest \(.+\); rerun the stage that wrote it"),
    ("parquet-truncated", data_parquet_truncated, TRAIN,
     r"data-copy/train-00000\.parquet: not a readable Parquet file \(.+\); " + PARQUET_FIX),
    ("decoder-data-parquet-truncated", data_parquet_truncated, DECODE,
     r"data-copy/train-00000\.parquet: not a readable Parquet file \(.+\); " + PARQUET_FIX),
    ("data-manifest-other-image-shape", _edit_json("data", "manifest.json", _set("image_shape", [14, 56, 1])), TRAIN,
     r"data-copy/train-00000\.parquet: holds \[28, 28, 1\] images but .*data-copy/manifest\.json says "
     r"image_shape \[14, 56, 1\]; " + PARQUET_FIX),
    ("train-limit-0", None, [*TRAIN, "--limit", "0"], r"--limit 0: must be >= 1"),
    ("train-unknown-prior", None, [*TRAIN, "--prior", "gatd"], r"unknown prior 'gatd'; registered priors: .*pixelcnn"),
    ("train-negative-seed", None, [*TRAIN, "--seed", "-1"], r"--seed -1: must be >= 0"),
    ("train-even-kernel", None, [*TRAIN, "--kernel", "4"], r"prior 'pixelcnn': invalid config .*kernel_size=4 must be odd"),
    ("train-pyramid-bad-factors", None, ["train-prior", "--data", "{data}", "--out", "{out}", "--prior", "pyramid",
                                         "--factors", "0,x"], r"prior 'pyramid': invalid config .*every factor must be"),
    ("parquet-shard-replaced", data_shard_replaced, ["embed", *PRIOR, "--dim", "16"],
     r"test-00000\.parquet: holds 10 rows but its manifest says 64; " + PARQUET_FIX),
    ("density-0", None, ["embed", *PRIOR, "--density", "0"], r"--density 0: must be in \(0, 1\]"),
    ("density-above-1", None, ["embed", *PRIOR, "--density", "1.5"], r"--density 1\.5: must be in \(0, 1\]"),
    ("dim-0", None, ["embed", *PRIOR, "--dim", "0"], r"--dim '0': dimensions must be >= 1"),
    ("prior-nan", _poisoned("prior", float("nan")), ["embed", *PRIOR, "--dim", "16"],
     r"prior-copy/weights\.pt: tensor '.+' holds NaN or Inf; rerun `fisher train-prior`"),
    ("prior-inf", _poisoned("prior", float("inf")), ["embed", *PRIOR, "--dim", "16"],
     r"prior-copy/weights\.pt: tensor '.+' holds NaN or Inf; rerun `fisher train-prior`"),
    ("prior-wrong-architecture", prior_wrong_arch, ["embed", *PRIOR, "--dim", "16"],
     r"prior-copy/weights\.pt: does not match the architecture in module\.json \(\d+ missing tensor\(s\), e\.g\. '[^']+'.*\); "
     r"rerun `fisher train-prior`"),
    ("prior-pickle-with-code", _pickled("prior"), ["embed", *PRIOR, "--dim", "16"],
     r"prior-copy/weights\.pt: not a plain weights file \(.*GLOBAL (posix|os)\.system.*\); nothing in it was run"),
    ("prior-weights-is-a-dir", prior_weights_is_dir, ["embed", *PRIOR, "--dim", "16"],
     r"prior-copy/weights\.pt: cannot be read \(.*is a directory\); it must be a readable file"),
    ("embed-rerun-mixed-seed", emb_mixed_seed_rerun, ["embed", *PRIOR, "--dim", "16"],
     r"out/test-00000\.parquet: made with seed 1, but .*/out with seed 0; a shard of another `fisher embed` "
     r"run was mixed in: delete it"),
    ("decoder-mixed-seed", emb_mixed_seed, DECODE,
     r"emb-copy/test-00000\.parquet: made with seed 1, but .*emb-copy with seed 0; .*delete it"),
    ("decoder-emb-nan", emb_nan, DECODE,
     r"emb-copy/train-00000\.parquet: column 'z' holds NaN or Inf in 1 of 64 rows .*rerun `fisher embed`"),
    ("decoder-other-data", data_other, DECODE,
     r"embeddings were made from other data than .*data-copy; pass the --data used by `fisher embed`"),
    ("decoder-other-prior-resume", emb_other_prior_resume, DECODE,
     r"/out: holds a train-decoder run with another config or inputs; pass a new --out"),
    ("evaluate-other-prior", emb_other_prior, ["evaluate", *INPUTS, "--pairs", "2"],
     r"dec: trained on embeddings \w+ \(.*\), not on .*emb-copy \(\w+\); pass matching --embeddings"),
    ("interpolate-other-prior", emb_other_prior, ["interpolate", *INPUTS],
     r"dec: trained on embeddings \w+ \(.*\), not on .*emb-copy \(\w+\); pass matching --embeddings"),
    ("interpolate-emb-inf", emb_inf, ["interpolate", *INPUTS],
     r"emb-copy/test-00000\.parquet: column 'z' holds NaN or Inf in 1 of 64 rows"),
    ("evaluate-reference-grey-without-grey", data_without_grey, ["evaluate", *INPUTS, "--pairs", "2",
                                                                 "--reference", "grey"],
     r"^fisher evaluate: error: --reference grey: .*data-copy has no 'grey' column, only image \(2 levels\) "
     r"\(MNIST prepared before grey originals were kept: prepare it again into a new --out\); "
     r"pass --reference image$"),
    ("evaluate-decoder-z-dim", dec_zdim, ["evaluate", *INPUTS, "--pairs", "2"],
     r"dec8: decodes 8-dim embeddings, but column 'z' of .* has dim 16; pass the decoder trained on these"),
    ("interpolate-decoder-weights-z-dim", dec_weights_zdim, ["interpolate", *INPUTS],
     r"dec-copy/weights\.pt: does not match the architecture in module\.json \(3 of another shape, e\.g\. "
     r"'z_mean' \[8\] where the architecture has \[16\]\); retrain the decoder"),
    ("decoder-option-of-another-decoder", None, [*DECODE, "--channels", "8"],
     r"--channels: not an option of decoder 'conv' \(passed with --decoder conv\); its options: --base-channels"),
    ("decoder-realnvp-temperature", None, [*DECODE, "--decoder", "realnvp", "--temperature", "-1"],
     r"decoder 'realnvp': invalid config \{'temperature': -1\.0\} \(temperature=-1\.0: must be a finite number >= 0\)"),
    ("decoder-realnvp-scales", None, [*DECODE, "--decoder", "realnvp", "--scales", "3"],
     r"decoder 'realnvp': scales=3 needs sides divisible by 2\^3; the image is 7x7 at scale 2; pass a smaller "
     r"--scales \(0: as many as fit\)"),
    # the generative decoders (paper Figure 7): a critic's NaN weight, weights of another decoder kind, a
    # decoder for embeddings of another width, a bad WGAN option
    ("interpolate-wgan-critic-nan", dec_wgan_nan_critic, ["interpolate", *INPUTS],
     r"wgan16/weights\.pt: tensor 'critic\.layers\.1\.0\.weight' holds NaN or Inf; retrain the decoder"),
    ("interpolate-decoder-weights-of-another-kind", dec_weights_of_another_kind, ["interpolate", *INPUTS],
     r"dec-copy/weights\.pt: does not match the architecture in module\.json \(\d+ (missing|unexpected) tensor\(s\), "
     r"e\.g\. '[^']+'.*\); retrain the decoder"),
    ("evaluate-wgan-z-dim", lambda c: {"dec": _wgan(c, 8)}, ["evaluate", *INPUTS, "--pairs", "2"],
     r"wgan8: decodes 8-dim embeddings, but column 'z' of .* has dim 16; pass the decoder trained on these"),
    ("decoder-wgan-n-critic", None, [*DECODE, "--decoder", "wgan", "--n-critic", "0"],
     r"decoder 'wgan': invalid config \{'n_critic': 0\} \(n_critic=0: must be >= 1\)"),
    ("decoder-pixelcnn-even-kernel", None, [*DECODE, "--decoder", "pixelcnn", "--kernel", "4"],
     r"decoder 'pixelcnn': invalid config \{'kernel': 4\} \(layers=5, filters=120, kernel=4: need layers >= 1, "
     r"filters >= 1 and an odd kernel >= 3\)"),
    # the seed papers' latent-variable baselines: a kind and a model that do not match, a decoder of a latent
    # for embeddings that are no latent, a model built for other images
    ("embed-fisher-of-a-pixelvae", prior_pixelvae, ["embed", *PRIOR, "--dim", "16"],
     r"--kind fisher: prior 'pixelvae' has no exact log-likelihood \(its log_prob is the ELBO bound\), so no "
     r"Fisher score; embed its latent with --kind pixelvae"),
    ("embed-latent-kind-of-a-pixelcnn", None, ["embed", *PRIOR, "--kind", "pixelvae"],
     r"--kind pixelvae: needs a `fisher train-prior --prior pixelvae` model as --prior, got a 'pixelcnn' prior"),
    ("decoder-latent-of-fisher-scores", None, [*DECODE, "--decoder", "latent"],
     r"decoder 'latent': prior 'pixelcnn' has no latent \(pixelvae and realnvp have\); decode its embeddings "
     r"with a trained decoder"),
    ("train-pixelvae-other-size", None, ["train-prior", "--data", "{data}", "--out", "{out}", "--prior", "pixelvae",
                                         "--height", "14"],
     r"pixelvae built for 14x28 images, got 28x28; rebuild it with --height 28 --width 28"),
    ("train-is-samples-0", None, [*TRAIN, "--prior", "pixelvae", "--is-samples", "0"], r"--is-samples 0: must be >= 1"),
    ("train-realnvp-scales", None, ["train-prior", "--data", "{data}", "--out", "{out}", "--prior", "realnvp",
                                    "--scales", "3"],
     r"prior 'realnvp': scales=3 needs sides divisible by 2\^3; the image is 7x7 at scale 2; pass a smaller --scales"),
    ("interpolate-prior-as-decoder", lambda c: {"dec": c.good["prior"]}, ["interpolate", *INPUTS],
     r"prior/module\.json: a 'prior' checkpoint, not a decoder; pass a decoder checkpoint directory"),
    ("interpolate-decoder-inf", _poisoned("dec", float("-inf")), ["interpolate", *INPUTS],
     r"dec-copy/weights\.pt: tensor '.+' holds NaN or Inf; retrain the decoder"),
    ("interpolate-decoder-pickle-with-code", _pickled("dec"), ["interpolate", *INPUTS],
     r"dec-copy/weights\.pt: not a plain weights file \(.*GLOBAL (posix|os)\.system.*\); nothing in it was run"),
    ("run-unknown-preset", None, ["run", "--preset", "mnist-huge", "--out", "{out}"],
     r"--preset mnist-huge: no such preset \(have .*mnist-small.*, or pass a \.json file\)"),
    ("run-bad-set", None, ["run", "--set", "prior=5", "--out", "{out}"],
     r"--set prior=5: expected SECTION\.KEY=VALUE with SECTION one of .*prior"),
    ("run-bad-latents", None, ["run", "--set", "latents.pixelvae=1", "--out", "{out}"],
     r"--set latents\.pixelvae=1: 'latents' is \{'pixelvae': 1\}; expected an object of latent-model sections named "
     r"by their embedding kind \(pixelvae, realnvp\)"),
    ("run-bad-set-section", None, ["run", "--set", "priors.epochs=5", "--out", "{out}"],
     r"--set priors\.epochs=5: expected SECTION\.KEY=VALUE"),
    ("probe-k-zero", None, ["probe", "--embeddings", "{emb}", "--data", "{data}", "--out", "{out}", "--k", "0"],
     r"--k 0: must be >= 1"),
    ("probe-ridge-text", None, ["probe", "--embeddings", "{emb}", "--data", "{data}", "--out", "{out}", "--ridge",
                                "lots"], r"--ridge 'lots': expected a number > 0 or 'auto'"),
    ("probe-missing-column", None, ["probe", "--embeddings", "{emb}", "--data", "{data}", "--out", "{out}",
                                    "--column", "nope"], r"no column 'nope' \(has z\); pass --column"),
    ("embed-reference-not-pixel", None, ["embed", *PRIOR, "--reference", "grey"],
     r"--reference grey: only for --kind pixel"),
    ("run-set-seeds-zero", None, ["run", "--set", "evaluate.seeds=0", "--out", "{out}"],
     r"evaluate\.seeds 0: must be an integer in 1\.\.100"),
    ("run-set-misspelt-key", None, ["run", "--set", "prior.epocs=5", "--out", "{out}"],
     r"--set prior\.epocs=5: `fisher train-prior` has no option --epocs; did you mean prior\.epochs\?"),
    ("run-set-bad-value", None, ["run", "--set", "decoder.epochs=0", "--out", "{out}"], r"--epochs 0: must be >= 1"),
    ("run-set-option-of-another-decoder", None, ["run", "--set", "decoder.channels=8", "--out", "{out}"],
     r"--channels: not an option of decoder 'conv'"),
    # outputs are claimed, never clobbered
    ("prepare-out-empty", None, [*MNIST[:5], "", *MNIST[6:]], r"--out '': an empty path .*; pass a new directory"),
    ("prepare-out-root", None, [*MNIST[:5], "/", *MNIST[6:]], r"--out /: a filesystem root; pass a new directory"),
    ("prepare-out-foreign-files", out_foreign, MNIST,
     r"/out: not empty and not made by `fisher prepare` \(holds notes\.txt\); pass a new or empty --out"),
    ("prepare-out-interrupted-embed", out_interrupted_embed, MNIST,
     r"/out: claimed by an unfinished `fisher embed`; pass a new --out"),
    ("prepare-keeps-foreign-shard", out_prepare_foreign_shard,
     ["prepare", "mnist", "--src", "{src}", "--out", "{out}", "--limit", str(N), "--shard-size", str(N)],
     r"out/test-00000\.parquet: not a shard written by `fisher prepare`; .*\(nothing was deleted\)"),
    ("train-out-is-data", _out_copy_of("data"), TRAIN, r"/out: holds a 'prepare' artifact; pass a new --out"),
    ("embed-out-foreign-files", out_foreign, ["embed", *PRIOR, "--dim", "16"],
     r"/out: not empty and not made by `fisher embed` \(holds notes\.txt\)"),
    ("decoder-out-is-prior", _out_copy_of("prior"), DECODE, r"/out: holds a 'train-prior' artifact; pass a new --out"),
    ("interpolate-out-foreign-files", out_foreign, ["interpolate", *INPUTS],
     r"/out: not empty and not made by `fisher interpolate`"),
    ("evaluate-out-is-embeddings", _out_copy_of("emb"), ["evaluate", *INPUTS, "--pairs", "2"],
     r"/out: holds a 'embed' artifact; pass a new --out"),
    ("run-out-foreign-files", out_foreign, ["run", "--out", "{out}"], r"/out: not empty and not made by `fisher run`"),
    # nothing non-finite published; counts, seeds and memory bounded before any work
    ("train-lr-inf", None, [*TRAIN, "--lr", "inf"], r"--lr inf: must be a finite number > 0"),
    ("decoder-lr-nan", None, [*DECODE, "--lr", "nan"], r"--lr nan: must be a finite number > 0"),
    ("sweep-lr-0", None, ["sweep", "--prior", "{prior}", "--data", "{data}", "--out", "{out}", "--lr", "0"],
     r"--lr 0\.0: must be a finite number > 0"),
    ("prepare-negative-seed", None, [*MNIST, "--seed", "-3"], r"--seed -3: must be >= 0"),
    ("edit-seed-too-large", None, ["edit", *INPUTS, "--attribute", "Smiling", "--seed", str(2**70)],
     r"--seed \d+: must be <= 9223372036854775807"),
    ("interpolate-pairs-1e9", None, ["interpolate", *INPUTS, "--pairs", "1000000000"],
     r"--pairs 1000000000: must be <= 1024 \(one decoded row each\)"),
    ("evaluate-pairs-1e9", None, ["evaluate", *INPUTS, "--pairs", "1000000000"],
     r"--pairs 1000000000: must be <= 1000000"),
    ("density-1e-30", None, ["embed", *PRIOR, "--density", "1e-30"],
     r"--density 1e-30: below 2\^-40 = 9\.09e-13, the smallest density a projection resolves"),
    ("embed-projection-too-big", None, ["embed", *PRIOR, "--dim", "1000000000", "--density", "1"],
     r"--dim 1000000000 x --density with \d+ features, --chunk-size 64, in 1 actor\(s\): needs about [\d.]+ GiB, "
     r"more than 80%"),
    ("embed-chunk-above-memory", None, ["embed", *PRIOR, "--dim", "16", "--chunk-size", "1000000"],
     r"--dim 16 x --density with \d+ features, --chunk-size 1000000, in 1 actor\(s\): needs about [\d.]+ GiB, "
     r"more than 80%"),
    ("embed-densities-same-column", None, ["embed", *PRIOR, "--dim", "16", "--density", "0.1234561,0.1234562"],
     r"two projections share the column name z_d16_p0\.123456 .*pass distinct values"),
    ("embed-negative-pca", None, ["embed", *PRIOR, "--dim", "16", "--pca", "-5"], r"--pca -5: must be >= 1"),
    ("embed-chunk-0", None, ["embed", *PRIOR, "--dim", "16", "--chunk-size", "0"], r"--chunk-size 0: must be >= 1"),
    ("evaluate-fid-weights-text", fid_weights_text, ["evaluate", *INPUTS, "--pairs", "2", "--fid-weights", "{fid}"],
     r"inception\.pth: not a plain tensor state dict \(.*\); pass pytorch-fid's"),
    ("evaluate-fid-weights-nan", fid_weights_nan, ["evaluate", *INPUTS, "--pairs", "2", "--fid-weights", "{fid}"],
     r"inception\.pth: tensor 'Mixed_7c\.branch_pool\.conv\.weight' holds NaN or Inf"),
    # no hangs: requests a local Ray can never meet, an --address where nothing answers
    ("train-gpu-without-gpu", None, [*TRAIN, "--gpu"], r"--gpu: this machine has 0 GPU\(s\) for a local Ray; drop --gpu"),
    ("embed-gpu-without-gpu", None, ["embed", *PRIOR, "--gpu"], r"--gpu: this machine has 0 GPU\(s\)"),
    ("sweep-gpus-per-trial-without-gpu", None, ["sweep", "--prior", "{prior}", "--data", "{data}", "--out", "{out}",
                                                "--gpus-per-trial", "0.5"], r"--gpus-per-trial: this machine has 0 GPU"),
    ("run-set-gpu-without-gpu", None, ["run", "--set", "embed.gpu=true", "--out", "{out}"],
     r"--gpu: this machine has 0 GPU\(s\)"),
    ("train-model-above-memory", None, [*TRAIN, "--filters", "4000", "--layers", "12"],
     r"--prior pixelcnn n_layers=12 filters=4000 at --batch-size 128 on 28x28x1 images, 1 worker\(s\): needs about "
     r"[\d.]+ GiB, more than 80% of this machine's [\d.]+ GiB; pass smaller values"),
    ("decoder-batch-above-memory", None, [*DECODE, "--batch-size", "1000000"],
     r"--decoder conv for 16-dim embeddings at --batch-size 1000000: needs about [\d.]+ GiB, more than 80%"),
    ("train-cpus-above-machine", None, [*TRAIN, "--cpus-per-worker", "64"],
     r"--cpus-per-worker 64\.0: needs 64 CPUs at once, but the local Ray has \d+; pass a smaller value"),
    ("train-workers-above-machine", None, [*TRAIN, "--workers", "64", "--cpus-per-worker", "0.5"],
     r"--cpus-per-worker 0\.5 x --workers 64: needs 32 CPUs at once"),
    ("embed-address-unreachable", None, ["embed", *PRIOR, "--address", "127.0.0.1:1"],
     r"--address 127\.0\.0\.1:1: nothing answers there \(.*waited at most 10 s\); check the address"),
    ("train-address-malformed", None, [*TRAIN, "--address", "headnode"],
     r"--address headnode: expected HOST:PORT of the Ray head"),
    # wrong-shape JSON, non-UTF-8 names, missing columns: one line naming the file and the field
    ("data-manifest-is-a-list", _edit_json("data", "manifest.json", lambda m: [m]), TRAIN,
     r"data-copy/manifest\.json: not a manifest \(a JSON list, not an object\); rerun the stage"),
    ("data-manifest-no-image-shape", _edit_json("data", "manifest.json", _set("image_shape", _DELETE)), TRAIN,
     r"manifest\.json: field 'image_shape' is None, not a JSON array; rerun the stage that wrote it"),
    ("data-manifest-negative-shape", _edit_json("data", "manifest.json", _set("image_shape", [28, -28, 1])),
     ["embed", *PRIOR, "--dim", "16"], r"manifest\.json: field 'image_shape' is \[28, -28, 1\], not \[H, W, C\]"),
    ("data-manifest-shard-outside", _edit_json("data", "manifest.json", _set("shards.0.file", "../../etc/passwd")),
     TRAIN, r"manifest\.json: shard entry .*etc/passwd.* does not name a file of this directory"),
    ("prior-module-json-negative-size", _edit_json("prior", "module.json", _set("config.filters", -8)),
     ["embed", *PRIOR, "--dim", "16"], r"prior-copy/module\.json: prior 'pixelcnn': invalid config .*filters=-8 must be >= 1"),
    ("prior-module-json-200000-layers", _edit_json("prior", "module.json", _set("config.n_layers", 200000)),
     ["embed", *PRIOR, "--dim", "16"], r"module\.json: config\.n_layers = 200000 is above 65536; rerun `fisher train-prior`"),
    ("prior-module-json-too-many-parameters",
     _edit_json("prior", "module.json", lambda m: _set("config.filters", 4096)(_set("config.n_layers", 10)(m))),
     ["embed", *PRIOR, "--dim", "16"], r"module\.json: describes [\d,]+ parameters, more than 1,073,741,824"),
    ("prior-module-json-wrong-type", _edit_json("prior", "module.json", _set("config.kernel_size", "seven")),
     ["embed", *PRIOR, "--dim", "16"], r"prior-copy/module\.json: .*kernel_size"),
    ("run-preset-prepare-null", _preset(_small_preset(prepare=None)), ["run", "--preset", "{preset}", "--out", "{out}"],
     r"preset\.json: section 'prepare' is None, not a JSON object of options"),
    ("run-preset-binary", _preset(bytes(range(256)) * 4), ["run", "--preset", "{preset}", "--out", "{out}"],
     r"preset\.json: not a JSON preset \(.*\); start from a copy of"),
    ("run-preset-list", _preset(b"[1, 2]"), ["run", "--preset", "{preset}", "--out", "{out}"],
     r"preset\.json: a preset is a JSON object of sections, not a list"),
    ("run-preset-unknown-dataset", _preset(_small_preset(dataset="cifar")), ["run", "--preset", "{preset}", "--out",
                                                                            "{out}"],
     r"preset\.json: 'dataset' is 'cifar'; expected \"mnist\" or \"celeba\""),
    # several priors (preset key "priors", celeba-small): both keys, a label that is no directory name, a
    # misspelt option of one prior, --set of a prior that is not there
    ("run-preset-prior-and-priors", _preset(_small_preset(priors={"a": {}})), ["run", "--preset", "{preset}", "--out",
                                                                              "{out}"],
     r"preset\.json: has both 'prior' and 'priors'; keep one"),
    ("run-preset-priors-bad-label", _preset(_small_preset(drop=("prior",), priors={"../up": {}})),
     ["run", "--preset", "{preset}", "--out", "{out}"],
     r"preset\.json: prior label '\.\./up' must be a lower-case name \(a-z, 0-9, _; not data or logs\)"),
    ("run-preset-priors-misspelt", celeba_raw, ["run", "--preset", "celeba-small", "--data", "{celeba}", "--set",
                                          "priors.gated.epocs=3", "--out", "{out}"],
     r"--set priors\.gated\.epocs=3: `fisher train-prior` has no option --epocs; did you mean priors\.gated\.epochs\?"),
    ("run-set-unknown-prior", celeba_raw, ["run", "--preset", "celeba-small", "--data", "{celeba}", "--set",
                                     "priors.vae.epochs=3", "--out", "{out}"],
     r"--set priors\.vae\.epochs=3: expected SECTION\.KEY=VALUE with SECTION one of .*priors\.pixelcnn, "
     r"priors\.gated, priors\.pyramid"),
    # several decoders (preset key "decoders", celeba-small): both keys, --set of a decoder that is not there
    ("run-preset-decoder-and-decoders", _preset(_small_preset(decoders={"conv": {}})),
     ["run", "--preset", "{preset}", "--out", "{out}"], r"preset\.json: has both 'decoder' and 'decoders'; keep one"),
    ("run-set-unknown-decoder", celeba_raw, ["run", "--preset", "celeba-small", "--data", "{celeba}", "--set",
                                       "decoders.wgan.epochs=3", "--out", "{out}"],
     r"--set decoders\.wgan\.epochs=3: expected SECTION\.KEY=VALUE with SECTION one of .*decoders\.conv, "
     r"decoders\.realnvp"),
    ("prepare-src-not-utf8", src_not_utf8, MNIST, r"--src '.*mnist-\\udcff': not a UTF-8 name; rename"),
    ("train-shard-without-image", shard_without_image, TRAIN,
     r"data-copy/train-00000\.parquet: no column 'image' \(has id, grey, label, split\); rerun `fisher prepare`"),
    ("embed-shard-without-image", shard_without_image, ["embed", *PRIOR, "--dim", "16"],
     r"data-copy/train-00000\.parquet: no column 'image'"),
    # data consistency
    ("attr-conflicting-duplicate", _celeba_duplicate("list_attr_celeba.txt", 4), CELEBA,
     r"list_attr_celeba\.txt line 12: 000002\.jpg is listed again \(first on line 4\); use the official CelebA"),
    ("partition-conflicting-duplicate", _celeba_duplicate("list_eval_partition.txt", 3), CELEBA,
     r"list_eval_partition\.txt line 10: 000003\.jpg is listed again; use the official CelebA file"),
    ("mnist-link-to-endless-device", mnist_endless, MNIST,
     r"train-images-idx3-ubyte\.gz: not an idx file \(bad magic number 00000000\); pass the original MNIST"),
    ("mnist-gzip-bomb", mnist_gzip_bomb, MNIST,
     r"train-images-idx3-ubyte\.gz: idx size mismatch \(header \(100, 28, 28\) needs 78416 bytes, found 78416 or "
     r"more\); the file is truncated or corrupt"),
    ("decoder-duplicate-ids", emb_duplicate_ids, DECODE,
     r"emb-copy/test-00000\.parquet: id 'train-\d+' is also in train-00000\.parquet; every image is embedded once"),
    # hostile pass 2: preset and --set values of the wrong JSON type or outside the choices, seeds the run adds
    # to, the architecture's config (all before the first step), manifest fields, vector widths, --out inside an
    # input, splits named nowhere, a non-finite --scale, a misspelt option
    ("run-set-float-for-int", None, ["run", "--set", "prepare.limit=8.5", "--out", "{out}"],
     r"--set prepare\.limit=8\.5: prepare\.limit is 8\.5, not an integer \(or null for the default\); fix the value"),
    ("run-set-outside-choices", None, ["run", "--set", "evaluate.reference=nope", "--out", "{out}"],
     r"--set evaluate\.reference=nope: evaluate\.reference is 'nope'; expected one of image, grey"),
    ("run-set-seed-text", None, ["run", "--set", "decoder.seed=x", "--out", "{out}"],
     r"--set decoder\.seed=x: decoder\.seed is 'x', not an integer"),
    ("run-set-grid-number", None, ["run", "--set", "sweep.grid=5", "--out", "{out}"],
     r"--set sweep\.grid=5: sweep\.grid is 5, not a string; pass a tune_spaces name"),
    ("run-set-architecture-type", None, ["run", "--set", "prior.train=true", "--set", "prior.filters=8.5", "--out",
                                         "{out}"], r"prior 'pixelcnn': option filters=8\.5 has the wrong type"),
    ("data-manifest-levels-0", _edit_json("data", "manifest.json", _set("levels", 0)), TRAIN,
     r"data-copy/manifest\.json: field 'levels' is 0, not an integer in \[2, 65536\]; rerun the stage"),
    ("data-manifest-rows-text", _edit_json("data", "manifest.json", _set("shards.0.rows", "many")), TRAIN,
     r"manifest\.json: shard train-00000\.parquet has 'rows' 'many', not a count >= 0"),
    ("interpolate-emb-short-vectors", emb_short_vectors, ["interpolate", *INPUTS],
     r"emb-copy/test-00000\.parquet: column 'z' is fixed_size_list<.*>\[8\], not the 16-dim float vectors .*rerun "
     r"`fisher embed`"),
    ("train-out-inside-data", data_copy, [*TRAIN[:4], "{data}/prior", *TRAIN[5:]],
     r"--out .*/data-copy/prior: inside the input --data .*/data-copy; pass an --out outside every input directory"),
    ("evaluate-floor-split-unknown", None, ["evaluate", *INPUTS, "--pairs", "2", "--floor-split", "nope"],
     r"--floor-split nope: .* has 0 images in it \(splits: test 64, train 64\); FID needs at least 2: pass another "
     r"--floor-split or --no-floor"),
    ("embed-splits-unknown", None, ["embed", *PRIOR, "--splits", "train,tset"],
     r"--splits train,tset: .* has no split 'tset' \(has test, train\); pass --splits"),
    ("edit-scale-nan", None, ["edit", *INPUTS, "--attribute", "Smiling", "--scale", "nan"],
     r"--scale nan: must be a finite number"),
    ("embed-misspelt-option", None, ["embed", *PRIOR, "--dimm", "16"],
     r"unrecognized arguments: --dimm 16 \(did you mean --dim\?\)"),
    ("evaluate-cache-is-a-file", cache_is_file, ["evaluate", *INPUTS, "--pairs", "2", "--cache", "{cache}"],
     r"--cache .*/fid-cache: exists and is not a directory; pass a directory for the real-image statistics"),
    ("embed-pca-above-dim", None, ["embed", *PRIOR, "--dim", "16", "--pca", "32"],
     r"--pca 32: larger than the embedding \(16\) or the train split \(64\); pass a smaller --pca"),
    ("embed-prior-of-other-images", _edit_json("data", "manifest.json", _set("levels", 4)),
     ["embed", *PRIOR, "--dim", "16"],
     r"--prior .*/prior: models images with levels=2, but .*data-copy holds levels=4; pass a prior trained on"),
    ("run-data-without-raw-files", None, ["run", "--data", "{data}", "--out", "{out}"],
     r"--data .*/data: no train-images-idx3-ubyte\.gz, .*; pass --data DIR \(or set \$FISHER_DATA\) with the raw "
     r"mnist files"),
    ("embed-cpus-below-ray-unit", None, ["embed", *PRIOR, "--dim", "16", "--cpus-per-actor", "1e-30"],
     r"--cpus-per-actor 1e-30: Ray counts resources in steps of 0\.0001; pass a finite value of at least 0\.0001"),
    ("embed-data-empty", None, ["embed", "--prior", "{prior}", "--data", "", "--out", "{out}"],
     r"--data '': an empty path; pass the directory itself"),
    ("train-out-name-with-newline", out_newline_file, [*TRAIN[:4], "{tmp}/a\nb", *TRAIN[5:]],
     r"--out .*/a\\nb: exists and is not a directory; pass a new directory path"),
    # last: the only case that fails inside Ray (late Ray log lines cannot reach another case's stderr)
    ("parquet-corrupt-pages", data_parquet_corrupt, ["embed", *PRIOR, "--dim", "16"],
     r"data-copy/test-00000\.parquet: not a readable Parquet file \(.+\); delete it and rerun the stage"),
]
INSIDE_RAY = {"parquet-corrupt-pages"}     # Ray's own logs (with Ray Data's internal traceback) come first
RAY_LOG = re.compile(r"^(\x1b\[\d+m)?\((\S+ )?pid=|^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _snapshot(path: Path) -> dict[str, str] | None:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.is_dir():
        return None
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
            for f in sorted(path.rglob("*"))}


def run_case(build, argv_template, pattern, ctx: Ctx, capsys, inside_ray: bool = False) -> str:
    """Build the bad input, run the command, check the one-line error and --out; returns the error line.

    ``inside_ray``: the failure happens in a Ray task, whose own log lines may precede the error line (and,
    forwarded from workers, follow it); then no traceback may come from this project's code."""
    ctx.paths = {k: str(v) for k, v in ctx.good.items()}
    ctx.paths.update(out=str(ctx.tmp / "out"), tmp=str(ctx.tmp), src=str(ctx.good["mnist"]))
    if build is not None:
        ctx.paths.update({k: str(v) for k, v in build(ctx).items()})
    argv = [a.format(**ctx.paths) for a in argv_template]
    out = ctx.tmp / "out"
    before = _snapshot(out)
    capsys.readouterr()

    code = cli.main(argv)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}; stderr:\n{err}"
    if inside_ray:
        assert not re.search(r'File ".*/(fisher|raycluster)/\w+\.py"', err), err
        while lines and RAY_LOG.match(lines[-1]):
            lines.pop()
    else:
        assert "Traceback" not in err, err
    prefix = f"fisher {argv[0]}: error: "
    assert lines and lines[-1].startswith(prefix), err
    assert [line for line in lines if line.startswith("fisher ") and ": error:" in line] == [lines[-1]], err
    assert re.search(pattern, lines[-1]), f"{lines[-1]!r} does not match {pattern!r}"
    if before is not None:                                   # an existing --out is left as it was
        assert _snapshot(out) == before
    elif out.exists():
        left = {p.name for p in out.iterdir()}
        assert not left & set(FINISHED), left
        assert left != {"_plan.json"}, "a refused command left its claim on a new --out with no work in it"
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (ctx.tmp / "payload-ran").exists()            # pickled code was never executed
    return lines[-1]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, good, tmp_path, make_celeba, capsys):
    case_id, build, argv, pattern = case
    if "without-gpu" in case_id and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_case(build, argv, pattern, Ctx(good, tmp_path, make_celeba), capsys, inside_ray=case_id in INSIDE_RAY)


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[2][0] for c in CASES} >= {"prepare", "train-prior", "embed", "train-decoder", "interpolate",
                                        "evaluate", "run"}
