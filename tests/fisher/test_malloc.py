"""fisher.malloc: glibc's malloc kept from returning freed memory; the embeddings' bits do not change.

The setting is process-wide and cannot be undone, so each case runs in a fresh Python process."""
import hashlib
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# a Pyramid PixelCNN++ (the shifted convolutions the grouped method takes, strided and transposed ones),
# scored three times with a 64-dim projection: the bytes of the last embedding, and the setting's result
SCRIPT = """
import hashlib, sys, torch
from fisher.malloc import keep_freed_memory
from fisher.priors import build_prior
from fisher.projection import SparseProjection
from fisher.scores import fisher_scores, n_features
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
again = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model = build_prior("pyramid", channels=3, levels=32, factors="2", filters=8, nr_resnet=1, stages=2).eval()
x = torch.randint(0, 32, (6, 3, 32, 32))
p = SparseProjection(n_features(model), 64, None, seed=0)
for _ in range(3):
    z = fisher_scores(model, x, p, chunk_size=4)
print(applied, again, hashlib.sha256(z.numpy().tobytes()).hexdigest())
"""


def _run(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_keep_freed_memory_applies_once_and_leaves_the_bits():
    kept, default = _run("keep"), _run("default")
    assert kept[:2] == ["True", "True"] and default[:2] == ["None", "None"]
    assert kept[2] == default[2] and len(kept[2]) == len(hashlib.sha256().hexdigest())
