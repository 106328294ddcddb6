"""benchmarks/bench_scores.py: a method whose process dies is reported, not waited for forever."""
import multiprocessing as mp
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_scores  # noqa: E402


def _run(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=args)
    p.start()
    return bench_scores._result(p, q, "test")


def test_a_child_killed_by_a_signal_is_reported():
    res = _run(os.abort)                       # SIGABRT, as the OOM killer's SIGKILL: no result ever comes
    assert res == {"failed": "killed by signal 6"}


def test_a_child_that_exits_with_an_error_is_reported():
    res = _run(sys.exit, 3)
    assert res == {"failed": "exited with code 3"}


def test_a_result_is_returned():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=q.put, args=({"seconds": 1.0},))
    p.start()
    assert bench_scores._result(p, q, "test") == {"seconds": 1.0}


def test_saved_images_are_the_ones_the_tables_use(tmp_path, monkeypatch):
    """--save-images writes the prepared test images (to carry to a GPU machine without the raw data); a
    folder holding them, passed as --mnist or --celeba, gives the tables the same images."""
    import numpy as np
    mnist = str(bench_scores.SHARED)
    monkeypatch.setattr(sys, "argv", ["bench_scores.py", "--batch", "8", "--save-images", str(tmp_path / "m")])
    bench_scores.main()
    saved = np.load(tmp_path / "m" / "images.npy")
    assert saved.shape == (32, 28, 28, 1) and set(np.unique(saved)) <= {0, 1}
    assert np.array_equal(bench_scores._images(str(tmp_path / "m"), 8), bench_scores._images(mnist, 8))
    assert bench_scores._celeba_images(str(tmp_path / "m"), 32, 5) == (str(tmp_path / "m"), 32)
