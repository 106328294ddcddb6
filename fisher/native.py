"""C kernels (the sparse projection's column walk, a tiled transpose), compiled on first use for the machine.

``fisher/projection_kernels.c`` is compiled with the system's C compiler (``$CC``, else ``cc``) into a
shared library kept in ``$FISHER_CACHE`` (default ``~/.cache/fisher-ray``), under a name that hashes the
source, the flags, the compiler's version and the CPU's features, so a cache shared between machines
never hands one a library built for another; it is written to a temporary name and renamed, so
processes compiling at once (the actors of one node) never load a half-written file. Loading it is
ctypes; the kernel works on NumPy arrays' memory directly and releases the GIL (ctypes does).

It computes what the Numba kernel ``by_columns`` of :mod:`fisher.projection` computes, with the same
float32 operations in the same order (no fused multiply-add, no fast-math), so its results are
bitwise the same, and faster: a column's values stay in registers and ``restrict`` spares the alias checks
Numba makes for every non-zero. On the MNIST PixelCNN's wide blocks, 32 images, 2 threads, 40.6 ms
against 54.6 ms (``python benchmarks/bench_projection.py``); one band on one thread, 1.7-1.9x. Without a compiler, or with ``FISHER_NATIVE=0``,
the Numba kernel is used: same results, slower; the reason is given once as a ``RuntimeWarning``.

Where the compiler has OpenMP (``-fopenmp``; else the library is built without it) the walks of one
block's bands run as one call on OpenMP threads: the same libgomp torch loaded, so on the threads its
operations just used, still spinning, instead of on Python threads that had to wait for those cores
(2-4 ms per block on 2 cores; the MNIST PixelCNN's projection 0.11 -> 0.08 x a training step).

The library also holds ``transpose``, the tiled copy :func:`transposed` makes: :mod:`fisher.scores` stores the
per-offset conv blocks it projects features-major with it (each feature's B values side by side), which the
column walk reads in place, without gathering a column's values from B rows. Without the library, torch's
(strided, slower) copy does the same.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("projection_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-std=c99", "-fPIC", "-shared"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")        # a column of 32 floats in two registers where AVX-512 exists

_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def library_path(compiler: str, flags: list[str] = FLAGS) -> Path:
    """Where the library built by ``compiler`` with ``flags`` for this machine is (or will be) kept."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, platform.machine(),
                                    _cpu_features()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FISHER_CACHE") or Path.home() / ".cache" / "fisher-ray")
    return cache / "kernels" / f"projection_kernels-{key}.so"


def _compile(compiler: str, flags: list[str]) -> Path:
    path = library_path(compiler, flags)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _build() -> ctypes.CDLL:
    """The library, with OpenMP (``-fopenmp``) where the compiler has it, else without."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found; set CC)")
    try:
        path = _compile(compiler, FLAGS + ["-fopenmp"])
    except RuntimeError:
        path = _compile(compiler, FLAGS)
    return _load(path)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.by_columns.argtypes = [p, p, p, ctypes.c_float, p, i64, i64, i64, p, i64, i64, i64, i64, p, i64, i64, p]
    lib.by_columns.restype = None
    lib.by_columns_tasks.argtypes = [i64, p, p, p, p, p, i64, i64, i64, p, i64, i64, i64, i64, p, p, p, p,
                                     ctypes.c_int]
    lib.by_columns_tasks.restype = None
    lib.transpose.argtypes = [p, i64, i64, i64, p, i64, ctypes.c_int]
    lib.transpose.restype = None
    lib.has_openmp.restype = ctypes.c_int
    lib.openmp = bool(lib.has_openmp())
    return lib


def kernels() -> ctypes.CDLL | None:
    """The compiled library, or None (no compiler, a failed build, or ``FISHER_NATIVE=0``); built once per
    process, the reason for a None warned about once."""
    if "lib" in _STATE:                  # every band of every block asks: no lock once it is decided
        return _STATE["lib"]
    with _LOCK:
        if "lib" not in _STATE:
            lib = None
            if os.environ.get("FISHER_NATIVE", "1") != "0":
                try:
                    lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    warnings.warn(f"fisher: the C kernels are not available ({e}); using the projection's "
                                  "Numba kernel and torch's transpose (same results, slower)", RuntimeWarning,
                                  stacklevel=2)
            _STATE["lib"] = lib              # set once decided: the unlocked check above never sees it half-made
        return _STATE["lib"]


def _strides(a: np.ndarray) -> tuple[int, int]:
    return a.strides[0] // 4, a.strides[1] // 4


def _takes(indptr, rows, signs, x0, x1, acc, sums) -> bool:
    return not (indptr.dtype != np.int32 or rows.dtype != np.int32 or signs.dtype != np.int8
                or not indptr.flags.c_contiguous or not rows.flags.c_contiguous or not signs.flags.c_contiguous
                or acc.strides[1] != 4 or not sums.flags.c_contiguous
                or any(a.dtype != np.float32 for a in (x0, x1, acc, sums)) or x0.shape[0] + x1.shape[0] < 1
                or acc.shape[1] != x0.shape[0] + x1.shape[0] or sums.shape != acc.shape)


def by_columns_tasks(lib: ctypes.CDLL, tasks: list[tuple], x0: np.ndarray, x1: np.ndarray, threads: int) -> bool:
    """Several column walks over the same ``x0``, ``x1`` (``tasks``: (indptr, rows, signs, scale, acc, sums)
    each, disjoint ``acc`` and ``sums``), on ``threads`` OpenMP threads; False, with nothing done, where
    the library has no OpenMP or an array is not one the kernel takes."""
    if not lib.openmp or not all(_takes(t[0], t[1], t[2], x0, x1, t[4], t[5]) for t in tasks):
        return False
    (s0k, s0j), (s1k, s1j) = _strides(x0), _strides(x1)

    def addresses(i):
        return np.array([t[i].ctypes.data for t in tasks], dtype=np.uint64)

    pointers = [addresses(i) for i in (0, 1, 2, 4, 5)]
    scales = np.array([t[3] for t in tasks], dtype=np.float32)
    strides = np.array([t[4].strides[0] // 4 for t in tasks], dtype=np.int64)
    nrows = np.array([t[4].shape[0] for t in tasks], dtype=np.int64)
    lib.by_columns_tasks(len(tasks), pointers[0].ctypes.data, pointers[1].ctypes.data, pointers[2].ctypes.data,
                         scales.ctypes.data, x0.ctypes.data, x0.shape[0], s0k, s0j,
                         x1.ctypes.data if x1.size else x0.ctypes.data, x1.shape[0], s1k, s1j, x0.shape[1],
                         pointers[3].ctypes.data, strides.ctypes.data, nrows.ctypes.data, pointers[4].ctypes.data,
                         int(threads))
    return True


def by_columns(lib: ctypes.CDLL, indptr: np.ndarray, rows: np.ndarray, signs: np.ndarray, scale: np.float32,
               x0: np.ndarray, x1: np.ndarray, acc: np.ndarray, sums: np.ndarray) -> bool:
    """The column walk of :func:`fisher.projection._kernels`' ``by_columns`` (same arguments, less its gather
    buffer) in C; False, with nothing done, for arrays it does not take (64-bit column pointers, acc's
    columns not contiguous)."""
    if not _takes(indptr, rows, signs, x0, x1, acc, sums):
        return False
    (s0k, s0j), (s1k, s1j) = _strides(x0), _strides(x1)
    lib.by_columns(indptr.ctypes.data, rows.ctypes.data, signs.ctypes.data, float(scale),
                   x0.ctypes.data, x0.shape[0], s0k, s0j, x1.ctypes.data if x1.size else x0.ctypes.data, x1.shape[0],
                   s1k, s1j, x0.shape[1], acc.ctypes.data, acc.strides[0] // 4, acc.shape[0], sums.ctypes.data)
    return True


def transposed(x: torch.Tensor, threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.t()`` copied into ``out`` (default: a new contiguous tensor) and returned. For float32 CPU tensors
    with contiguous rows, the library's tiled transpose on ``threads`` OpenMP threads (1.5-3x faster than
    torch's strided copy on 2 cores); otherwise torch's copy."""
    if out is None:
        out = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype, device=x.device)
    lib = kernels() if x.device.type == "cpu" and out.device.type == "cpu" else None
    if (lib is None or x.dtype != torch.float32 or out.dtype != torch.float32 or x.dim() != 2
            or x.stride(1) != 1 or out.stride(1) != 1 or out.shape != x.shape[::-1]):
        return out.copy_(x.t())
    if out.numel():
        lib.transpose(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), out.stride(0), int(threads))
    return out
