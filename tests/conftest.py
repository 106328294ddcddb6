"""Shared fixtures: where the real data is, and small generated MNIST / CelebA inputs."""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Ray's log handlers keep the stream they were created with. When that was a pytest capture that has
# closed since (an earlier test's), logging prints "--- Logging error ---" and a traceback through
# whatever code logged, into the stderr the bad-input corpus inspects: an artifact of the harness,
# not output a user sees. Without this, test_bad_inputs' corrupt-Parquet case failed in a full run.
logging.raiseExceptions = False

# Ray Train V2's controller advances one state (scheduling, running, finished, ...) per health-check
# interval, 2 s by default: several seconds of each tiny test fit are that sleep. Every Ray the tests
# start (in-process or in a subprocess) inherits this; a user's runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

SHARED_DATA = Path(os.environ.get("FISHER_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MNIST_NAMES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` (uint8 or big-endian int32) as an idx file."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The real MNIST idx folder if present, else a small generated one (600 train / 100 test)."""
    real = SHARED_DATA / "mnist"
    if all((real / n).exists() for pair in MNIST_NAMES.values() for n in pair):
        return real
    out = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("test", 100)):
        grey = (rng.random((n, 28, 28)) ** 3 * 255).astype(np.uint8)
        write_idx(out / MNIST_NAMES[split][0], grey)
        write_idx(out / MNIST_NAMES[split][1], rng.integers(0, 10, n).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def celeba_real() -> Path:
    path = SHARED_DATA / "celeba"
    if not (path / "img_align_celeba").is_dir():
        pytest.skip(f"real CelebA not found at {path} (set FISHER_SHARED_DATA)")
    return path


@pytest.fixture
def make_celeba(tmp_path):
    """``make_celeba(counts={'train': 3, ...}, unlisted=2)`` → (root, {name: (split, attrs ±1)}).

    Writes random 178x218 JPEGs into root/img_align_celeba and official-format (CRLF) attribute
    and partition files that also list ``unlisted`` images that are not present.
    """
    def make(counts=None, unlisted=2, root=None):
        root = Path(root or tmp_path / "celeba")
        (root / "img_align_celeba").mkdir(parents=True)
        rng = np.random.default_rng(1)
        counts = counts or {"train": 5, "val": 2, "test": 2}
        splits = [s for s, n in counts.items() for _ in range(n)] + ["train"] * unlisted
        rows = {}
        for i, split in enumerate(splits, start=1):
            rows[f"{i:06d}.jpg"] = (split, rng.choice([-1, 1], 40))
            if i <= len(splits) - unlisted:
                small = rng.integers(0, 256, (28, 23, 3), dtype=np.uint8)
                Image.fromarray(small).resize((178, 218)).save(root / "img_align_celeba" / f"{i:06d}.jpg", quality=95)
        codes = {"train": 0, "val": 1, "test": 2}
        attr_lines = [str(len(rows)), " ".join(f"Attr_{k}" for k in range(40))]
        attr_lines += [f"{n} " + " ".join(f"{v:2d}" for v in a) for n, (_, a) in rows.items()]
        (root / "list_attr_celeba.txt").write_bytes(("\r\n".join(attr_lines) + "\r\n").encode())
        (root / "list_eval_partition.txt").write_bytes(
            "\r\n".join(f"{n} {codes[s]}" for n, (s, _) in rows.items()).encode())
        return root, rows
    return make


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy shared 2-core machine, 2 spinning threads make the convs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
