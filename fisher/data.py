"""Datasets and the Parquet shard format (DESIGN.md, "Data flow and formats").

Yan, Ho, Abbeel, sec. 5.1 (MNIST): "Images were binarized by sampling from
Bernoulli random variables biased by grayscale pixel values." Each image gets
its own random stream seeded by (seed, split, index), so the binarization does
not depend on how the data is chunked.

Sec. 5.2 (CelebA): "We follow the standard procedure of cropping raw 218 x 178
CelebA images into 128 x 128 CelebA images. All autoregressive models and
decoders are trained to model 5-bit images." The crop is the centred face box
:data:`CELEBA_CROP` on the aligned images; an optional BOX resize gives the
small 64/32 presets; then ``v >> (8 - bits)`` keeps ``2**bits`` levels.

A prepared artifact is a directory of ``{split}-{k:05d}.parquet`` shards
(columns ``id``, ``image`` = raw HxWxC uint8 bytes, for MNIST ``grey``, ``label`` int64 or
``attrs`` 40 x int8 in {0,1}, ``split``; rows sorted by id; image shape in the
schema metadata key ``image_shape``, the config under ``fisher_prepare_config``)
plus ``manifest.json``, written last. Shard k holds inputs k*S..(k+1)*S-1, so an
interrupted run's finished shards are found again and kept by a rerun.

Reference columns. Binarized MNIST is Bernoulli(grey/255), so a decoder's mean image estimates the
grey original, not the binary draw; prepared MNIST therefore keeps the original pixels in a ``grey``
column (same layout and shape as ``image``, values 0..255) beside the binarized ``image`` (which is
unchanged: the same per-image Bernoulli streams). The manifest key ``references`` maps every image
column to its number of levels: ``{"image": 2, "grey": 256}`` for MNIST, ``{"image": 32}`` for 5-bit
CelebA (no grey column). An artifact prepared before this key existed has ``image`` only
(:func:`data_references`). :func:`decode_images` / ``load_rows(columns=("grey",))`` read either column.
"""
from __future__ import annotations

import gzip
import http.client
import io
import json
import re
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from fisher.io import (
    MANIFEST,
    PLAN,
    FisherError,
    atomic_write_bytes,
    atomic_write_table,
    claim_output,
    exists,
    is_dir,
    join,
    list_files,
    read_manifest,
    read_table,
    resolve,
    write_manifest,
)

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}   # also CelebA's list_eval_partition.txt codes
MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MNIST_NAMES = tuple(name for pair in MNIST_FILES.values() for name in pair)
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CELEBA_IMAGE_SIZE = (178, 218)                      # (width, height) of img_align_celeba
CELEBA_CROP = (25, 45, 153, 173)                    # (left, top, right, bottom): 128x128 face box
CELEBA_ATTRS, CELEBA_PARTITION, CELEBA_IMAGES = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"
N_ATTRS = 40
SHAPE_KEY = b"image_shape"
GREY_LEVELS = 256          # levels of MNIST's grey originals (the ``grey`` column)
IMAGE_COLUMNS = ("image", "grey")   # columns of raw HxWxC uint8 bytes, in shard order
CONFIG_KEY, SKIPPED_KEY = b"fisher_prepare_config", b"fisher_skipped"   # shard metadata: what made it, bad inputs
SHARD_RE = re.compile(r"^\.?(train|val|test)-\d{5}\.parquet(\.tmp-[0-9a-f]+)?$")   # with atomic-write temps
DECODE_CHUNK = 64          # CelebA files per decoding task
SKIPPED_LISTED = 10        # bad images named in the manifest
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_SRC_HINT = f"pass --src with a directory holding the four MNIST idx .gz files ({', '.join(MNIST_NAMES)})"
_CELEBA_SRC_HINT = (f"pass --src with the CelebA folder holding {CELEBA_IMAGES}/, {CELEBA_ATTRS} "
                    f"and {CELEBA_PARTITION}")
_SKIP_HINT = "replace the file or pass --skip-bad to skip bad images"


# ---------------------------------------------------------------- configs

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FisherError(message)


def _norm_src(uri: str) -> str:
    return str(uri) if "://" in str(uri) else resolve(uri)[1]


@dataclass(frozen=True)
class MnistConfig:
    """Binarized MNIST (paper sec. 5.1): 28x28x1, values {0,1}."""
    src: str                         # directory with the four idx .gz files
    seed: int = 0                    # Bernoulli binarization seed
    shard_size: int = 10_000         # rows per Parquet shard
    limit: int | None = None         # only the first N images per split (small runs)

    def __post_init__(self):
        object.__setattr__(self, "src", _norm_src(self.src))
        _check(self.seed >= 0, f"--seed {self.seed}: must be >= 0")
        _check_common(self.shard_size, self.limit)

    def to_dict(self) -> dict:
        return {"dataset": "mnist", **asdict(self), "binarize": "bernoulli(pixel/255), per-image seed"}


@dataclass(frozen=True)
class CelebaConfig:
    """5-bit CelebA (paper sec. 5.2): CELEBA_CROP, optional resize to ``size``, ``bits`` bits."""
    src: str                         # folder with img_align_celeba/ and the two list files
    size: int = 128                  # output side; 64/32 for small runs (BOX resize)
    bits: int = 5                    # bits kept per sub-pixel: values in [0, 2**bits)
    shard_size: int = 10_000
    limit: int | None = None
    skip_bad: bool = False           # skip (and count) unreadable images instead of failing
    crop: tuple[int, int, int, int] = field(default=CELEBA_CROP)

    def __post_init__(self):
        object.__setattr__(self, "src", _norm_src(self.src))
        object.__setattr__(self, "crop", tuple(self.crop))
        left, top, right, bottom = self.crop
        side = right - left
        _check(0 <= left < right <= CELEBA_IMAGE_SIZE[0] and 0 <= top < bottom <= CELEBA_IMAGE_SIZE[1]
               and bottom - top == side, f"crop {self.crop}: must be a square box inside the 178x218 image")
        _check(1 <= self.size <= side, f"--size {self.size}: must be between 1 and the crop side {side}")
        _check(1 <= self.bits <= 8, f"--bits {self.bits}: must be between 1 and 8")
        _check_common(self.shard_size, self.limit)
        _check(self.shard_size * self.size ** 2 * 3 < 2 ** 31,
               f"--shard-size {self.shard_size}: a shard of {self.size}x{self.size}x3 images would exceed 2 GiB; "
               f"use at most {(2 ** 31 - 1) // (self.size ** 2 * 3)}")

    def to_dict(self) -> dict:
        return {"dataset": "celeba", **asdict(self), "resample": "box"}


def _check_common(shard_size: int, limit: int | None) -> None:
    _check(shard_size >= 1, f"--shard-size {shard_size}: must be >= 1")
    _check(limit is None or limit >= 1, f"--limit {limit}: must be >= 1")


# ---------------------------------------------------------------- MNIST

def _read_raw(uri: str, hint: str) -> bytes:
    """File bytes as stored (pyarrow would otherwise gunzip ``*.gz`` files by their extension)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FisherError(f"{uri}: file not found; {hint}") from e
    except OSError as e:                # a file where a directory belongs, a directory here, no permission
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FisherError(f"{uri}: cannot be read ({reason}); {hint}") from e


MAX_IDX_BYTES = 1 << 30      # the largest idx payload read (MNIST's largest file: 47 MB)


def read_idx(path_or_uri: str) -> np.ndarray:
    """Read an idx file (gzip or raw), checking the magic number and the size. The read is bounded by the
    sizes its header declares: an endless device, a gzip bomb or trailing bytes are refused, never read whole."""
    uri = str(path_or_uri)
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path, compression=None) as raw:
            head = raw.read(2)
            stream = gzip.GzipFile(fileobj=_Prefixed(head, raw)) if head == b"\x1f\x8b" else _Prefixed(head, raw)
            return _read_idx_stream(uri, stream)
    except FileNotFoundError as e:
        raise FisherError(f"{uri}: file not found; {_MNIST_SRC_HINT}") from e
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise FisherError(f"{uri}: corrupt or truncated gzip ({e}); download the file again") from e
    except OSError as e:                # a file where a directory belongs, a directory here, no permission
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FisherError(f"{uri}: cannot be read ({reason}); {_MNIST_SRC_HINT}") from e


class _Prefixed:
    """A read-only stream: ``prefix`` bytes, then the rest of ``raw``."""

    def __init__(self, prefix: bytes, raw):
        self.prefix, self.raw = prefix, raw

    def read(self, n: int = -1) -> bytes:
        out, self.prefix = self.prefix[:n] if n >= 0 else self.prefix, self.prefix[n:] if n >= 0 else b""
        return out + (self.raw.read(n - len(out)) if n < 0 or len(out) < n else b"")


def _read_idx_stream(uri: str, f) -> np.ndarray:
    magic = f.read(4)
    _check(len(magic) == 4 and magic[:2] == b"\0\0" and magic[2] in _IDX_DTYPES and magic[3] >= 1,
           f"{uri}: not an idx file (bad magic number {magic.hex()}); pass the original MNIST idx files")
    ndim, dtype = magic[3], np.dtype(_IDX_DTYPES[magic[2]])
    dims = f.read(4 * ndim)
    _check(len(dims) == 4 * ndim, f"{uri}: truncated idx header; download the file again")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4", ndim))
    payload = int(np.prod(shape, dtype=object)) * dtype.itemsize
    expected = 4 + 4 * ndim + payload
    _check(payload <= MAX_IDX_BYTES, f"{uri}: idx header declares {shape}, {payload} bytes, more than "
                                     f"{MAX_IDX_BYTES}; pass the original MNIST idx files")
    data = f.read(payload)
    extra = f.read(1)
    _check(len(data) == payload and not extra,
           f"{uri}: idx size mismatch (header {shape} needs {expected} bytes, found "
           f"{4 + 4 * ndim + len(data)}{' or more' if extra else ''}); the file is truncated or corrupt, download it again")
    return np.frombuffer(data, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def binarize(images: np.ndarray, seed: int, split: str, start_index: int = 0) -> np.ndarray:
    """Bernoulli(pixel/255) samples in {0,1}; image i uses its own stream seeded by (seed, split, i).

    ``start_index`` is the global index of ``images[0]``, so any chunking gives the same result.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"binarize expects uint8 images, got {images.dtype}")
    out = np.empty(images.shape, np.uint8)
    for j, img in enumerate(images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], start_index + j]))
        out[j] = rng.random(img.shape) < img / 255.0
    return out


def mnist_download(dir_uri: str) -> str:
    """Download the four MNIST idx .gz files into ``dir_uri`` where absent (torchvision's mirrors)."""
    for name in MNIST_NAMES:
        target = join(dir_uri, name)
        if exists(target):
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=60) as response:
                    atomic_write_bytes(target, response.read())
                break
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise FisherError(f"{target}: missing and could not be downloaded ({'; '.join(errors)}); "
                              f"{_MNIST_SRC_HINT}")
    return dir_uri


def load_mnist_split(src: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grey images [N,28,28] uint8 and labels [N] int64 of one MNIST split, validated."""
    img_uri, lab_uri = (join(src, n) for n in MNIST_FILES[split])
    images, labels = read_idx(img_uri), read_idx(lab_uri)
    _check(images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28),
           f"{img_uri}: expected uint8 images of shape [N, 28, 28], found {images.dtype} {list(images.shape)}")
    _check(labels.ndim == 1 and len(labels) == len(images) and np.isin(labels, np.arange(10)).all(),
           f"{lab_uri}: expected {len(images)} labels in 0..9 matching {img_uri}")
    _check(len(images) > 0, f"{img_uri}: holds 0 images, an empty dataset; {_MNIST_SRC_HINT}")
    return images[:limit], labels[:limit].astype(np.int64)


def _mnist_source(cfg: MnistConfig) -> _Source:
    """All of MNIST is read (and checked) up front, it is small; shards are binarized as they are written."""
    splits = {split: load_mnist_split(cfg.src, split, cfg.limit) for split in MNIST_FILES}

    def make(jobs: list[_Job]) -> Iterator[tuple[_Job, list[str], np.ndarray, np.ndarray, list[dict], dict]]:
        for job in jobs:
            grey, labels = (a[job.start:job.stop] for a in splits[job.split])
            ids = [f"{job.split}-{i:05d}" for i in range(job.start, job.stop)]
            yield job, ids, binarize(grey, cfg.seed, job.split, job.start)[..., None], labels, [], \
                {"grey": grey[..., None]}
    return ({split: len(grey) for split, (grey, _) in splits.items()},
            {"image_shape": [28, 28, 1], "levels": 2, "references": {"image": 2, "grey": GREY_LEVELS},
             "label_names": [str(d) for d in range(10)]}, make)


# ---------------------------------------------------------------- CelebA

def _read_lines(uri: str) -> list[str]:
    try:
        return _read_raw(uri, _CELEBA_SRC_HINT).decode("utf-8-sig").splitlines()    # drops a BOM (an editor's)
    except UnicodeDecodeError as e:
        raise FisherError(f"{uri}: not a text file ({e}); use the official CelebA file") from e


def _line_error(uri: str, lineno: int, problem: str) -> FisherError:
    return FisherError(f"{uri} line {lineno}: {problem}; use the official CelebA file")


def read_celeba_attrs(uri: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Parse list_attr_celeba.txt: (40 attribute names, {file name: int8[40] in {0,1}})."""
    lines = _read_lines(uri)
    _check(len(lines) >= 2 and lines[0].strip().isdigit(), f"{uri} line 1: expected the row count; "
                                                           "use the official CelebA file")
    names = lines[1].split()
    if len(names) != N_ATTRS:
        raise _line_error(uri, 2, f"expected {N_ATTRS} attribute names, found {len(names)}")
    rows = [(lineno, *line.strip().partition(" ")[::2]) for lineno, line in enumerate(lines[2:], start=3)
            if line.strip()]
    if len(rows) != int(lines[0]):
        raise FisherError(f"{uri} line 1: says {int(lines[0])} rows, found {len(rows)}; "
                          "the file is truncated, use the official CelebA file")
    values = _parse_signs(rows)
    if values is None:
        _raise_first_bad_row(uri, rows)
    _no_duplicates(uri, [(lineno, name) for lineno, name, _ in rows])
    table = (values + 1) // 2
    return names, {name: table[i] for i, (_, name, _) in enumerate(rows)}


def _no_duplicates(uri: str, rows: Iterable[tuple[int, str]]) -> None:
    """Refuse an image listed twice (the second row would silently win)."""
    first: dict[str, int] = {}
    for lineno, name in rows:
        if name in first:
            raise _line_error(uri, lineno, f"{name} is listed again (first on line {first[name]})")
        first[name] = lineno


def _parse_signs(rows: list[tuple[int, str, str]]) -> np.ndarray | None:
    """Fast path: all rows' values as int8 [n, 40] in {-1, 1}, or None if anything is off."""
    if any(rest.count("1") != N_ATTRS for _, _, rest in rows):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(" ".join(rest for _, _, rest in rows), np.int8, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    ok = values.size == len(rows) * N_ATTRS and np.isin(values, (-1, 1)).all()
    return values.reshape(len(rows), N_ATTRS) if ok else None


def _raise_first_bad_row(uri: str, rows: list[tuple[int, str, str]]) -> None:
    for lineno, _, rest in rows:
        values = rest.split()
        if len(values) != N_ATTRS:
            raise _line_error(uri, lineno, f"expected {N_ATTRS + 1} columns, found {len(values) + 1}")
        if not set(values) <= {"1", "-1"}:
            raise _line_error(uri, lineno, "attribute values must be 1 or -1")
    raise FisherError(f"{uri}: unreadable attribute values; use the official CelebA file")


def read_celeba_partition(uri: str) -> dict[str, str]:
    """Parse list_eval_partition.txt: {file name: 'train' | 'val' | 'test'}."""
    split_of = {str(code): split for split, code in SPLIT_CODES.items()}
    out = {}
    for lineno, line in enumerate(_read_lines(uri), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in split_of:
            raise _line_error(uri, lineno, f"expected '<name>.jpg 0|1|2', found {line.strip()!r}")
        if parts[0] in out:
            raise _line_error(uri, lineno, f"{parts[0]} is listed again")
        out[parts[0]] = split_of[parts[1]]
    return out


def load_celeba_image(uri: str, size: int = 128, bits: int = 5, crop: tuple = CELEBA_CROP) -> np.ndarray:
    """One aligned CelebA JPEG → uint8 [size, size, 3] in [0, 2**bits): crop, BOX resize, bit reduction."""
    raw = _read_raw(uri, _SKIP_HINT)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()                                   # decode fully: truncated files fail here
            _check(im.size == CELEBA_IMAGE_SIZE, f"{uri}: image is {im.size[0]}x{im.size[1]}, expected "
                                                 f"178x218 (aligned img_align_celeba); {_SKIP_HINT}")
            im = im.convert("RGB").crop(crop)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = re.sub(r" <[^<>]* at 0x[0-9a-f]+>", "", (str(e).splitlines() or [type(e).__name__])[0])  # no address
        raise FisherError(f"{uri}: not a readable JPEG ({reason}); {_SKIP_HINT}") from e
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BOX)
    return np.asarray(im, np.uint8) >> (8 - bits)


def decode_celeba_files(uris: list[str], size: int = 128, bits: int = 5, crop: tuple = CELEBA_CROP,
                        skip_bad: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """Decode a chunk of files: (images [n_ok, size, size, 3], {index in chunk: error} for skipped ones).

    Module-level so process pools can pickle it; raises FisherError on the first bad file unless skip_bad.
    """
    images, bad = [], {}
    for i, uri in enumerate(uris):
        try:
            images.append(load_celeba_image(uri, size, bits, crop))
        except FisherError as e:
            if not skip_bad:
                raise
            bad[i] = str(e)
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), bad


def celeba_files(src: str, limit: int | None = None) -> dict[str, list[str]]:
    """Present image URIs per split (sorted; first ``limit`` per split), via list_eval_partition.txt."""
    folder = join(src, CELEBA_IMAGES)
    _check(is_dir(folder), f"{folder}: not a directory; {_CELEBA_SRC_HINT}")
    uris = list_files(folder, ".jpg")
    _check(bool(uris), f"{folder}: no .jpg files; {_CELEBA_SRC_HINT}")
    partition = read_celeba_partition(join(src, CELEBA_PARTITION))
    by_split = {split: [] for split in SPLIT_CODES}
    for uri in uris:
        name = uri.rsplit("/", 1)[-1]
        _check(name in partition, f"{uri}: no row for {name} in {join(src, CELEBA_PARTITION)}; "
                                  "use the official partition file or remove the image")
        by_split[partition[name]].append(uri)
    return {split: files[:limit] for split, files in by_split.items()}


Mapper = Callable[[Callable, list], Iterable]


def _celeba_source(cfg: CelebaConfig, mapper: Mapper | None) -> _Source:
    """Attributes and partition are read (and checked) up front; JPEGs are decoded shard by shard, so
    memory holds one shard's worth of images and a rerun decodes only the shards not yet written."""
    attr_names, attrs = read_celeba_attrs(join(cfg.src, CELEBA_ATTRS))
    files = celeba_files(cfg.src, cfg.limit)
    for uri in (u for split_files in files.values() for u in split_files):
        name = uri.rsplit("/", 1)[-1]
        _check(name in attrs, f"{uri}: no row for {name} in {join(cfg.src, CELEBA_ATTRS)}; "
                              "use the official attribute file or remove the image")
    decode = _Decoder(cfg.size, cfg.bits, cfg.crop, cfg.skip_bad)

    def make(jobs: list[_Job]) -> Iterator[tuple[_Job, list[str], np.ndarray, np.ndarray, list[dict], dict]]:
        tasks = [(job, files[job.split][i:min(i + DECODE_CHUNK, job.stop)])
                 for job in jobs for i in range(job.start, job.stop, DECODE_CHUNK)]
        results = iter((mapper or map)(decode, [chunk for _, chunk in tasks]))
        for job in jobs:                      # tasks are in job order: gather each job's chunks
            names, arrays, bad = [], [], []
            for _, chunk in (t for t in tasks if t[0] is job):
                images, chunk_bad = next(results)
                names += [u.rsplit("/", 1)[-1] for i, u in enumerate(chunk) if i not in chunk_bad]
                bad += [{"name": chunk[i].rsplit("/", 1)[-1], "error": msg} for i, msg in chunk_bad.items()]
                arrays.append(images)
            targets = np.stack([attrs[n] for n in names]) if names else np.zeros((0, N_ATTRS), np.int8)
            yield job, [n.rsplit(".", 1)[0] for n in names], np.concatenate(arrays), targets, bad, {}
    extra = {"image_shape": [cfg.size, cfg.size, 3], "levels": 2 ** cfg.bits, "references": {"image": 2 ** cfg.bits},
             "attr_names": attr_names}
    return {split: len(uris) for split, uris in files.items()}, extra, make


@dataclass(frozen=True)
class _Decoder:
    """Picklable ``decode_celeba_files`` with fixed options (for process pools)."""
    size: int
    bits: int
    crop: tuple
    skip_bad: bool

    def __call__(self, uris: list[str]) -> tuple[np.ndarray, dict[int, str]]:
        return decode_celeba_files(uris, self.size, self.bits, self.crop, self.skip_bad)


# ---------------------------------------------------------------- shards

def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.parquet"


def _binary_column(images: np.ndarray) -> pa.Array:
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    offsets = np.arange(len(flat) + 1, dtype=np.int32) * flat.shape[1]
    return pa.Array.from_buffers(pa.binary(), len(flat), [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def write_shards(out_uri: str, split: str, ids: list[str], images: np.ndarray, labels_or_attrs: np.ndarray,
                 shard_size: int = 10_000, first: int = 0, metadata: dict[bytes, bytes] | None = None,
                 extra_images: Mapping[str, np.ndarray] | None = None) -> list[dict]:
    """Write one split as ``{split}-{k:05d}.parquet`` shards sorted by id; returns [{file, split, rows}].

    ``labels_or_attrs`` is [N] (→ ``label`` int64) or [N, 40] in {0,1} (→ ``attrs`` list<int8>[40]).
    ``extra_images`` ({'grey': uint8 [N,H,W,C]}, same shape as ``images``) become columns of the same
    layout right after ``image``. Shards are numbered from ``first``; ``metadata`` is added to each
    shard's schema metadata.
    """
    images, targets = np.asarray(images, np.uint8), np.asarray(labels_or_attrs)
    extra = {name: np.asarray(a, np.uint8) for name, a in (extra_images or {}).items()}
    if images.ndim != 4 or len(images) != len(ids) or len(targets) != len(ids):
        raise ValueError(f"write_shards: need images [N,H,W,C] and N ids/targets, got {images.shape}, "
                         f"{len(ids)} ids, {targets.shape} targets")
    for name, a in extra.items():
        if name not in IMAGE_COLUMNS[1:] or a.shape != images.shape:
            raise ValueError(f"write_shards: extra image column {name!r} {a.shape}: must be one of "
                             f"{IMAGE_COLUMNS[1:]} with the shape of images {images.shape}")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    if (order != np.arange(len(order))).any():          # the builders pass sorted ids: no copy then
        ids, images, targets = [ids[i] for i in order], images[order], targets[order]
        extra = {name: a[order] for name, a in extra.items()}
    target_field = (pa.field("label", pa.int64()) if targets.ndim == 1 else
                    pa.field("attrs", pa.list_(pa.int8(), targets.shape[1])))
    names = [c for c in IMAGE_COLUMNS[1:] if c in extra]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), *((c, pa.binary()) for c in names),
                        target_field, ("split", pa.string())],
                       metadata={SHAPE_KEY: json.dumps(list(images.shape[1:])).encode(), **(metadata or {})})
    shards = []
    for k, start in enumerate(range(0, len(ids), shard_size), start=first):
        sl = slice(start, start + shard_size)
        t = targets[sl]
        target_col = (pa.array(t, pa.int64()) if t.ndim == 1 else
                      pa.FixedSizeListArray.from_arrays(pa.array(t.ravel(), pa.int8()), type=target_field.type))
        table = pa.Table.from_arrays([pa.array(ids[sl], pa.string()), _binary_column(images[sl]),
                                      *(_binary_column(extra[c][sl]) for c in names), target_col,
                                      pa.array([split] * len(t), pa.string())], schema=schema)
        atomic_write_table(join(out_uri, shard_name(split, k)), table)
        shards.append({"file": shard_name(split, k), "split": split, "rows": len(t)})
    return shards


def decode_images(table_or_batch: pa.Table | pa.RecordBatch | Mapping, shape: tuple | list | None = None,
                  column: str = "image") -> np.ndarray:
    """An image column (``image``, or MNIST's ``grey``) as uint8 [N, H, W, C]; shape from ``shape=`` or the
    schema metadata.

    Accepts a pyarrow Table/RecordBatch or a dict batch (Ray Data), whose column may be a pyarrow
    array, a numpy object array or a list of bytes.
    """
    schema = getattr(table_or_batch, "schema", None)
    if shape is None and schema is not None and schema.metadata and SHAPE_KEY in schema.metadata:
        shape = json.loads(schema.metadata[SHAPE_KEY])
    if shape is None:
        raise ValueError("decode_images: no image_shape in the schema metadata; pass shape=[H, W, C] "
                         "(it is in the prepare manifest)")
    names = (table_or_batch.column_names if hasattr(table_or_batch, "column_names")
             else list(table_or_batch.keys()))
    if column not in names:
        raise FisherError(f"no '{column}' column in the prepared data (has {', '.join(names)})"
                          + ("; MNIST prepared before grey originals were kept has none: prepare it again "
                             "into a new --out" if column == "grey" else ""))
    column = table_or_batch[column]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n, per_image = len(column), int(np.prod(shape))
    if n == 0:
        return np.zeros((0, *shape), np.uint8)
    if isinstance(column, pa.Array):
        offsets = np.frombuffer(column.buffers()[1], np.int64 if pa.types.is_large_binary(column.type) else np.int32)
        offsets = offsets[column.offset:column.offset + n + 1]
        flat = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
        sizes = np.diff(offsets)
    else:
        flat = np.frombuffer(b"".join(bytes(x) for x in column), np.uint8)
        sizes = np.array([len(x) for x in column])
    if not (sizes == per_image).all():
        raise ValueError(f"decode_images: images of shape {list(shape)} need {per_image} bytes each, "
                         f"found sizes {sorted(set(sizes.tolist()))[:5]}")
    return flat.reshape(n, *shape).copy()


def check_shards(dir_uri: str, manifest: dict, splits=None, columns=("id", "image")) -> list[str]:
    """The prepared shards of ``splits`` (all when None), each checked from its footer alone before any
    work: readable (not truncated or replaced), the rows and ``columns`` its manifest promises, and
    images of the manifest's ``image_shape`` (the shape each shard's schema records). Returns their URIs."""
    from fisher.io import parquet_metadata
    fix = f"rerun `fisher prepare` for {dir_uri}"
    shape = list(manifest["image_shape"])
    out = []
    for s in manifest["shards"]:
        if splits is not None and s["split"] not in splits:
            continue
        uri = join(dir_uri, s["file"])
        meta = parquet_metadata(uri, s.get("rows"), fix=fix, columns=columns)
        kept = (meta.metadata or {}).get(SHAPE_KEY)
        if kept is not None and json.loads(kept) != shape:
            raise FisherError(f"{uri}: holds {json.loads(kept)} images but {join(dir_uri, MANIFEST)} says "
                              f"image_shape {shape}; {fix}")
        out.append(uri)
    return out


def load_prepared(dir_uri: str, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """A whole split of a prepared artifact in memory: {'id', 'image' [N,H,W,C], 'grey' [N,H,W,C] where the
    data keeps it (MNIST), 'label' or 'attrs'}."""
    manifest = read_manifest(dir_uri, "prepare")
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    _check(bool(files), f"{dir_uri}: no '{split}' split (has {sorted(manifest['counts'])})")
    table = pa.concat_tables([read_table(join(dir_uri, f)) for f in files]).slice(0, limit)
    target = "label" if "label" in table.column_names else "attrs"
    values = table[target].combine_chunks()
    targets = (values.to_numpy() if target == "label" else
               values.flatten().to_numpy().reshape(len(values), -1))
    images = {c: decode_images(table, manifest["image_shape"], c) for c in IMAGE_COLUMNS if c in table.column_names}
    return {"id": np.array(table["id"].to_pylist()), **images, target: targets}


# ---------------------------------------------------------------- the prepare stage

def _reusable(out: str, config: dict) -> dict | None:
    """The manifest of a complete artifact made with ``config``; None if absent or incomplete."""
    if not exists(join(out, MANIFEST)):
        return None
    manifest = read_manifest(out)
    _check(manifest.get("stage") == "prepare", f"{out}: holds a '{manifest.get('stage')}' artifact, not "
                                               "prepared data; pass another --out")
    old = manifest.get("config", {})
    if old != config:
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now"
                         for k in sorted(old.keys() | config.keys()) if old.get(k) != config.get(k))
        raise FisherError(f"{out}: already prepared with a different config ({diff}); "
                          "pass another --out or delete that directory")
    return manifest if all(exists(join(out, s["file"])) for s in manifest["shards"]) else None


@dataclass(frozen=True)
class _Job:
    """One output shard: inputs ``start:stop`` of ``split`` (by input, so a rerun finds the same shards)."""
    split: str
    k: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.k)


_Source = tuple[dict, dict, Callable[[list[_Job]], Iterable[tuple]]]   # (input counts, manifest extras, make)


def _finished(out: str, config: dict, job: _Job, columns: list[str]) -> tuple[int, list[dict]] | None:
    """(rows, skipped images) of a shard that an earlier, interrupted run with ``config`` completed
    (with these ``columns``: a shard written before MNIST kept its grey column is rewritten)."""
    fs, path = resolve(join(out, job.name))
    try:
        footer = pq.read_metadata(path, filesystem=fs)
    except (OSError, pa.ArrowException):
        return None                           # absent, or not a whole Parquet file
    meta = footer.metadata or {}
    if meta.get(CONFIG_KEY) != _config_bytes(config) or footer.schema.to_arrow_schema().names != columns:
        return None
    skipped = json.loads(meta.get(SKIPPED_KEY, b"[]"))
    return (footer.num_rows, skipped) if footer.num_rows + len(skipped) == job.stop - job.start else None


def _config_bytes(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True).encode()


def _remove_shards(out: str, keep: Iterable[str] = ()) -> None:
    """Delete this stage's shards (but ``keep``), its temporary shard files and the manifest: leftovers of
    a killed or failed run. A shard-named file that `fisher prepare` did not write (no prepare config in
    its footer: another stage's shard, a user's file) is never deleted; it is refused."""
    fs, path = resolve(out)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    keep, infos = set(keep), fs.get_file_info(pafs.FileSelector(path))
    doomed = [i for i in infos if SHARD_RE.match(i.base_name) and i.base_name not in keep]
    for info in doomed:
        if ".tmp-" in info.base_name:
            continue
        try:
            ours = CONFIG_KEY in (pq.read_metadata(info.path, filesystem=fs).metadata or {})
        except (OSError, pa.ArrowException):
            ours = False
        if not ours:
            raise FisherError(f"{join(out, info.base_name)}: not a shard written by `fisher prepare`; "
                              "move it out of --out or pass a new --out (nothing was deleted)")
    for info in doomed + [i for i in infos if i.base_name == MANIFEST]:
        fs.delete_file(info.path)


def _prepare(out: str, cfg: MnistConfig | CelebaConfig, source: Callable[[], _Source],
             log: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Write the shards a previous run did not finish, then the manifest.

    Shards are cut by input position (``shard_size`` inputs each) and carry the config in their
    metadata, so rerunning an interrupted command keeps the finished shards and the result is the
    same bytes. Bad input found on the way (a corrupt JPEG) removes all shards: nothing half-written.
    """
    config = json.loads(json.dumps(cfg.to_dict()))
    manifest = _reusable(out, config)
    if manifest is not None:
        return manifest, True
    counts, extra, make = source()            # everything but the pixels read and checked before any write
    columns = ["id", *(c for c in IMAGE_COLUMNS if c in extra["references"]),
               "label" if config["dataset"] == "mnist" else "attrs", "split"]
    claimed_now = not exists(join(out, PLAN)) and not exists(join(out, MANIFEST))
    claim_output(out, "prepare")
    jobs = [_Job(split, k, start, min(start + cfg.shard_size, n)) for split, n in counts.items()
            for k, start in enumerate(range(0, n, cfg.shard_size))]
    done = {job.name: found for job in jobs if (found := _finished(out, config, job, columns))}
    _remove_shards(out, keep=done)
    if done:
        log(f"prepare: {len(done)} of {len(jobs)} shards already done")
    meta = {CONFIG_KEY: _config_bytes(config)}
    try:
        for job, ids, images, targets, bad, extra_images in make([j for j in jobs if j.name not in done]):
            if ids:
                write_shards(out, job.split, ids, images, targets, len(ids), first=job.k,
                             metadata={**meta, SKIPPED_KEY: json.dumps(bad).encode()} if bad else meta,
                             extra_images=extra_images)
            done[job.name] = (len(ids), bad)
        bad = [b for job in jobs for b in done[job.name][1]]
        if not any(done[job.name][0] for job in jobs):
            raise FisherError(f"{out}: no image could be read" + (f" (first: {bad[0]['error']})" if bad else ""))
    except FisherError:
        _remove_shards(out)
        if claimed_now:                       # bad input: leave --out as it was, claim included
            resolve(join(out, PLAN))[0].delete_file(resolve(join(out, PLAN))[1])
        raise
    shards = [{"file": job.name, "split": job.split, "rows": done[job.name][0]} for job in jobs if done[job.name][0]]
    return write_manifest(out, "prepare", config, shards=shards,
                          counts={split: sum(s["rows"] for s in shards if s["split"] == split) for split in counts},
                          columns=columns,
                          skipped={"count": len(bad), "first": bad[:SKIPPED_LISTED]}, **extra), False


def prepare_mnist(cfg: MnistConfig, out: str, log: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Binarize MNIST into shards under ``out``; returns (manifest, True if it was already prepared).
    ``log`` takes the progress lines (a rerun's shards already done)."""
    return _prepare(out, cfg, lambda: _mnist_source(cfg), log=log)


def prepare_celeba(cfg: CelebaConfig, out: str, mapper: Mapper | None = None,
                   log: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Crop/resize/bit-reduce CelebA into shards under ``out``; returns (manifest, already prepared).

    ``mapper(fn, chunks)`` runs ``fn`` over lists of image URIs and yields results in order
    (default: the built-in ``map``; the CLI passes a process pool's map with progress).
    """
    return _prepare(out, cfg, lambda: _celeba_source(cfg, mapper), log=log)


def data_references(manifest: dict) -> dict[str, int]:
    """Image columns of a prepared dataset (its ``prepare`` manifest) → levels: ``{"image": 2, "grey": 256}``
    for MNIST, ``{"image": 32}`` for 5-bit CelebA; ``{"image": levels}`` for data prepared before the
    ``references`` key (MNIST without its grey originals)."""
    refs = manifest.get("references")
    if refs is None:
        return {"image": data_levels(manifest)}
    if (not isinstance(refs, dict) or "image" not in refs or not set(refs) <= set(IMAGE_COLUMNS)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in refs.values())):
        raise FisherError(f"manifest of the prepared data: 'references' is {refs!r}, not a map of "
                          f"{'/'.join(IMAGE_COLUMNS)} to levels >= 2; rerun `fisher prepare`")
    return dict(refs)


def reference_column(manifest: dict, requested: str | None, where: str) -> tuple[str, int]:
    """(column, levels) of the real images FID compares with (``fisher evaluate --reference``).

    Default: ``grey`` where the data keeps it (a decoder's mean estimates the grey image, binarized MNIST
    being Bernoulli(grey/255)), else ``image``. Asking for a column the data lacks is a one-line error
    naming the option and what ``where`` holds.
    """
    refs = data_references(manifest)
    column = requested or ("grey" if "grey" in refs else "image")
    if column not in refs:
        what = ", ".join(f"{c} ({v} levels)" for c, v in refs.items())
        why = (" (MNIST prepared before grey originals were kept: prepare it again into a new --out)"
               if manifest.get("config", {}).get("dataset") == "mnist" else "")
        raise FisherError(f"--reference {column}: {where} has no '{column}' column, only {what}{why}; "
                          f"pass --reference {next(iter(refs))}")
    return column, refs[column]


def data_levels(manifest: dict) -> int:
    """Values per sub-pixel of a prepared dataset (its ``prepare`` manifest): 2 for binarized MNIST."""
    given = (manifest.get("levels"), (manifest.get("config") or {}).get("levels"))
    value = next((v for v in given if v is not None), 2)       # 0 is refused, not read as 'missing'
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise FisherError(f"manifest of the prepared data: 'levels' is {value!r}, not an integer >= 2; "
                          "rerun `fisher prepare`")
    return value
