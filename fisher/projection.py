"""Seeded sparse random projection (paper sec. 3.3, eq. 1; Li, Hastie, Church 2006).

For ``n`` features, output dimension ``p`` and density ``d`` (default
1/√n), with ``s = 1/d``, every entry of the ``p × n`` matrix ``P`` is
independently ``+√s/√p`` or ``-√s/√p`` with probability ``1/(2s)`` each and 0
otherwise. (The paper prints ``s/√p``; ``√s/√p`` is what preserves norms in
expectation, E‖Pg‖² = ‖g‖², and is what scikit-learn uses.)

The matrix is a pure function of ``(seed, n, p, d)``: it is generated on the
CPU with NumPy in fixed column blocks of ``BLOCK`` features, each from its own
seeded stream, so every process, machine and device builds the same bits.
Non-zeros are drawn as geometric gaps between positions of the block
(column-major), which samples every entry as an exact i.i.d. Bernoulli(d)
without touching the zeros. It is stored column-compressed (int32 rows and
int8 signs, in two bands of rows) or, at density 1, as one sign bit per entry;
never as a float array. Products slice it into per-layer column blocks, so
per-layer gradients are projected as they are produced, multiply sparse blocks
with small compiled kernels (Numba; the column walk in C where a compiler
exists, :mod:`fisher.native`) whose float32 operations are those of a sparse
matrix product, in its order, and expand only the 4096-column float32 blocks a
dense product needs (:class:`ProjectionStack`).
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from fisher import native

BLOCK = 1 << 16          # features per generation block (part of the matrix's definition)
DENSE_ABOVE = 0.25       # densities above this are applied as dense matrices (same values)
MIN_DENSITY = 2.0 ** -40  # the density's resolution in the generator's key: smaller ones are not distinct


def estimated_bytes(n_features: int, dim: int, density: float) -> int:
    """Host memory a projection takes: its stored matrix (one bit per entry at density 1; an int32 row and
    an int8 sign per non-zero otherwise), plus, above ``DENSE_ABOVE``, the float32 blocks it is applied
    as (``ProjectionStack.WIDTH`` columns per thread, two threads counted)."""
    stored = n_features * dim / 8 if density >= 1.0 else 5 * n_features * dim * density
    return int(stored + (2 * 4 * ProjectionStack.WIDTH * dim if density > DENSE_ABOVE else 0))


@dataclass(frozen=True)
class ProjectionSpec:
    """What identifies a projection; stored in embedding manifests."""
    n_features: int
    dim: int
    density: float
    seed: int = 0

    @property
    def name(self) -> str:
        return f"z_d{self.dim}_p{self.density:.6g}_s{self.seed}"


def validate(n_features: int, dim: int, density: float | None) -> float:
    from fisher.io import FisherError
    if n_features < 1:
        raise FisherError(f"n_features={n_features}: must be >= 1")
    if dim < 1:
        raise FisherError(f"dim={dim}: the projection dimension must be >= 1")
    if density is None:
        return 1.0 / math.sqrt(n_features)
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise FisherError(f"density={density}: must be in (0, 1] (or 'auto' for 1/sqrt(n_features))")
    if density < MIN_DENSITY:
        raise FisherError(f"density={density}: below 2^-40 = {MIN_DENSITY:.3g}, the smallest density a projection "
                          "resolves; pass a larger one")
    return float(density)


def _block_columns(seed: int, dim: int, density: float, block: int, ncols: int):
    """Non-zero positions (column-major, sorted) and their signs for one generation block.

    At density 1 every entry is non-zero and only the (ncols, dim) signs are returned.
    """
    key = [int(seed), int(block), int(dim), int(round(density * 2**40))]
    rng = np.random.default_rng(key)
    total = dim * ncols
    if density >= 1.0:                      # every entry non-zero: signs only, (ncols, dim)
        return None, (rng.integers(0, 2, size=(ncols, dim), dtype=np.int8) * 2 - 1).astype(np.int8)
    else:
        chunks, end = [], -1
        expected = total * density
        while end < total - 1:
            draw = int(expected + 6 * math.sqrt(expected) + 64)
            gaps = rng.geometric(density, size=draw)
            chunk = end + np.cumsum(gaps)
            chunks.append(chunk)
            end = int(chunk[-1])
        pos = np.concatenate(chunks)
        pos = pos[pos < total]
    signs = rng.integers(0, 2, size=pos.size, dtype=np.int8) * 2 - 1
    return pos, signs


class SparseProjection:
    """``P`` of paper eq. 1; ``project(g)`` returns ``g @ P.T`` for rows ``g`` of features.

    Storage: column-compressed non-zeros (int32 rows, int8 signs; 5 bytes each) in ``ROW_BANDS`` bands
    of rows, or, at density 1, one sign bit per entry, packed along the features of each row: 1/8
    byte per entry, where a float32 matrix would take 4. Products expand the float values they need
    block by block. A sparse member multiplied on the CPU with a column range narrower than ``dim`` (a
    small layer) also keeps that range row-major (:meth:`row_major`): at most the columns' own 5 bytes
    per non-zero again, once per range.
    """

    def __init__(self, n_features: int, dim: int, density: float | None = None, seed: int = 0):
        density = validate(n_features, dim, density)
        self.spec = ProjectionSpec(int(n_features), int(dim), density, int(seed))
        self.n_features, self.dim, self.density, self.seed = n_features, dim, density, seed
        self.scale = 1.0 / math.sqrt(density * dim)            # √s / √p
        self._dense = density >= 1.0
        indptr, rows, signs = [np.zeros(1, np.int64)], [], []
        for b, start in enumerate(range(0, n_features, BLOCK)):
            ncols = min(BLOCK, n_features - start)
            pos, sg = _block_columns(seed, dim, density, b, ncols)
            if pos is None:                  # (ncols, dim) signs → (dim, ncols / 8) bits, 1 = positive
                signs.append(np.packbits(sg.T > 0, axis=1))
                continue
            col, row = np.divmod(pos, dim)
            counts = np.bincount(col, minlength=ncols)
            indptr.append(indptr[-1][-1] + np.cumsum(counts))
            rows.append(row.astype(np.int32))
            signs.append(sg)
        self._bits, self._bands = None, []
        if self._dense:                      # every block but the last has a multiple of 8 columns
            self._bits = np.ascontiguousarray(np.concatenate(signs, axis=1))
        else:
            self._bands = _row_bands(np.concatenate(indptr), np.concatenate(rows) if rows else np.zeros(0, np.int32),
                                     np.concatenate(signs) if signs else np.zeros(0, np.int8), dim)
        self._stack: ProjectionStack | None = None
        self._row_major: dict[tuple[int, int], _RowMajor] = {}

    def row_major(self, start: int, stop: int) -> "_RowMajor":
        """Columns ``[start, stop)`` of a sparse ``P`` by rows (built on first use, then kept): the rows
        that have non-zeros there, and each one's columns (relative to ``start``, ascending) and signs."""
        key = (start, stop)
        if key not in self._row_major:
            rows, cols, signs = [], [], []
            for band in self._bands:
                lo, hi = int(band.indptr[start]), int(band.indptr[stop])
                rows.append(band.rows[lo:hi] + np.int32(band.row0))
                cols.append(np.repeat(np.arange(stop - start, dtype=np.int32), np.diff(band.indptr[start:stop + 1])))
                signs.append(band.signs[lo:hi])
            rows, cols, signs = np.concatenate(rows), np.concatenate(cols), np.concatenate(signs)
            order = np.lexsort((cols, rows))
            touched, counts = np.unique(rows[order], return_counts=True)
            self._row_major[key] = _RowMajor(touched.astype(np.int32),
                                             np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)]),
                                             cols[order], signs[order])
        return self._row_major[key]

    @property
    def nnz(self) -> int:
        return self.n_features * self.dim if self._dense else sum(int(b.signs.size) for b in self._bands)

    def stored_bytes(self) -> int:
        """Host memory the matrix itself takes."""
        if self._dense:
            return int(self._bits.nbytes)
        return sum(int(b.signs.nbytes + b.rows.nbytes + b.indptr.nbytes) for b in self._bands)

    def band_columns(self, band: "_Band", start: int, stop: int) -> sp.csc_matrix:
        """Columns ``[start, stop)`` of the rows ``[band.row0, band.row1)`` of a sparse ``P``: a SciPy CSC view
        of the stored rows, with float32 values ±scale."""
        lo, hi = int(band.indptr[start]), int(band.indptr[stop])
        data = band.signs[lo:hi].astype(np.float32) * np.float32(self.scale)
        return sp.csc_matrix((data, band.rows[lo:hi], band.indptr[start:stop + 1] - lo),
                             shape=(band.row1 - band.row0, stop - start))

    def expand_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Write columns ``[start, stop)`` of ``P`` (values ±scale) into the float32 ``out[:, :stop - start]``
        (dim rows); at density 1, 8 columns per byte through a 256-entry table."""
        if not self._dense:                  # a sparse-stored member applied densely (DENSE_ABOVE < density < 1)
            out[:, :stop - start].copy_(torch.from_numpy(self.columns(start, stop).toarray()))
            return
        lo, hi = start // 8, -(-stop // 8)
        width, shift = stop - start, start - 8 * lo
        idx = _scratch("bytes", self.dim * (hi - lo), torch.int32)
        idx.view(self.dim, hi - lo).copy_(torch.from_numpy(self._bits[:, lo:hi]))
        direct = shift == 0 and width == 8 * (hi - lo) == out.shape[1] and out.is_contiguous()
        vals = out if direct else _scratch("values", self.dim * (hi - lo) * 8).view(self.dim, (hi - lo) * 8)
        torch.index_select(_sign_table(self.scale), 0, idx, out=vals.view(-1, 8))
        if not direct:
            out[:, :width].copy_(vals[:, shift:shift + width])

    def columns(self, start: int, stop: int) -> sp.csc_matrix | np.ndarray:
        """Columns ``[start, stop)`` of ``P`` (values ±scale): SciPy CSC, or a dense array at density 1."""
        if self._dense:
            out = torch.empty(self.dim, stop - start)
            self.expand_into(out, start, stop)
            return out.numpy()
        return sp.vstack([self.band_columns(b, start, stop) for b in self._bands], format="csc")

    def dense(self) -> torch.Tensor:
        """The whole ``dim × n_features`` matrix, for small sizes (tests, inspection)."""
        if self.dim * self.n_features > 50_000_000:
            raise ValueError("dense() is for small projections; use project()")
        cols = self.columns(0, self.n_features)
        return torch.from_numpy(cols if isinstance(cols, np.ndarray) else cols.toarray())

    def project(self, g: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Project ``g`` (B × m) holding features ``[offset, offset+m)``; returns (B × dim).

        Projection is linear, so blocks of features (one layer's gradients)
        can be projected separately and summed.
        """
        if self._stack is None:
            self._stack = ProjectionStack([self])
        return self._stack.project(g, offset)[0]


ROW_BANDS = 2            # sparse matrices are stored as this many bands of rows, multiplied side by side


@dataclass(frozen=True)
class _Band:
    """Rows ``[row0, row1)`` of a sparse ``P``, column-compressed: ``rows`` relative to ``row0``."""
    row0: int
    row1: int
    indptr: np.ndarray
    rows: np.ndarray
    signs: np.ndarray


@dataclass(frozen=True)
class _RowMajor:
    """Some columns of a sparse ``P`` by rows: row ``rows[t]`` has its non-zeros at ``cols[indptr[t]:indptr[t + 1]]``
    (ascending) with signs ``signs[...]``; rows without any are left out."""
    rows: np.ndarray
    indptr: np.ndarray
    cols: np.ndarray
    signs: np.ndarray
    _splits: dict = field(default_factory=dict, compare=False, repr=False)

    def split(self, parts: int) -> list[tuple[int, int]]:
        """``parts`` ranges of ``rows`` with about equal non-zeros (kept: a prior's layers ask every chunk)."""
        if parts not in self._splits:
            cuts = np.searchsorted(self.indptr, np.linspace(0, self.indptr[-1], parts + 1)[1:-1])
            edges = [0, *(int(c) for c in cuts), len(self.rows)]
            self._splits[parts] = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        return self._splits[parts]


def _row_bands(indptr: np.ndarray, rows: np.ndarray, signs: np.ndarray, dim: int) -> list[_Band]:
    """The CSC matrix (indptr, rows, signs) cut into ``ROW_BANDS`` bands of rows (one for small ``dim``).
    Every output row of a product sums the same terms in the same column order whichever band holds it, so
    the bands only let the products run side by side."""
    n_bands = ROW_BANDS if dim >= 16 * ROW_BANDS else 1
    edges = [dim * k // n_bands for k in range(n_bands + 1)]
    index = np.int32 if rows.size < 2**31 else np.int64         # SciPy takes int32 column pointers with int32 rows
    if n_bands == 1:
        return [_Band(0, dim, indptr.astype(index), rows, signs)]
    bands = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        sel = (rows >= r0) & (rows < r1)
        before = np.concatenate([np.zeros(1, np.int64), np.cumsum(sel, dtype=np.int64)])
        bands.append(_Band(r0, r1, before[indptr].astype(index), (rows[sel] - r0).astype(np.int32), signs[sel]))
    return bands


def _readable(g: torch.Tensor) -> torch.Tensor:
    """A block (images × m) as the column walk reads it in place: stored images-major (rows of m features)
    or features-major (columns of B images, as fisher.scores yields most conv blocks: each column's values
    contiguous, so the walk reads them without a gather); any other strides are copied images-major."""
    return g if g.is_contiguous() or g.t().is_contiguous() else g.contiguous()


_LOCAL = threading.local()


def _scratch(key: str, numel: int, dtype=torch.float32) -> torch.Tensor:
    """A buffer of ``numel`` elements, kept per thread and per key and grown when needed: products reuse the
    same memory for every layer and chunk instead of asking the system for fresh pages (whose first touch
    costs about as much as filling them)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = bufs[key] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel]


_KERNELS: dict = {}


def _kernels():
    """The CPU products of a sparse member, compiled on first use (Numba, about 1 s per process); both add
    ``P[:, columns] @ x`` to ``acc`` (dim × B) for ``x`` (columns × B), with values ±``scale``:

    * ``by_columns(indptr, rows, signs, scale, x0, x1, acc, sums, tmp)`` walks the column-compressed
      storage (one band of rows) over the images' rows ``x0`` and ``x1`` (images × columns each, any
      strides; ``x1`` possibly empty): each column's values are gathered into ``tmp``, scattered into the
      ``sums`` of the rows it touches, then ``acc += sums``. Best when ``sums`` is the small operand (layers
      at least ``dim`` wide). Reading the blocks as they come (one or two chunks) spares transposing them,
      a copy that took about as long as the product for the 20 M-feature Pyramid. Where a C compiler
      exists the same walk runs as C (:mod:`fisher.native`, same bits), and this one only as the fallback.
    * ``by_rows(rows, indptr, cols, signs, scale, x, acc, lo, hi)`` walks a :class:`_RowMajor` (its rows
      ``[lo, hi)``): each row gathers the ``x`` rows of its columns into a sum kept in registers, then adds
      it to ``acc`` once. Best when ``x`` is the small operand (layers narrower than ``dim``): no scattered
      read-modify-write per non-zero.

    Both compute every element with the operations, in the order, of SciPy's ``csc_matvecs`` into zeros
    followed by ``acc += result``: ``s = +0.0``, then ``s += value · x[j]`` over the row's non-zeros in
    column order (a float32 product, then a float32 sum: no fused multiply-add), then ``acc[r] += s``; so
    the bits are those of the matrix product whichever walk is taken. (``by_rows`` adds nothing to rows the
    columns do not touch, where ``+ 0.0`` would only turn a -0.0 into +0.0.) They release the GIL, so parts of
    a product run side by side on threads, and the loops over B are vectorized for the machine they run on.
    """
    if not _KERNELS:
        import numba

        @numba.njit(nogil=True, boundscheck=False)
        def by_columns(indptr, rows, signs, scale, x0, x1, acc, sums, tmp):
            n0, m = x0.shape
            b = n0 + x1.shape[0]
            sums[:, :] = 0.0
            for j in range(m):
                if indptr[j] == indptr[j + 1]:
                    continue
                for k in range(n0):
                    tmp[k] = x0[k, j]
                for k in range(n0, b):
                    tmp[k] = x1[k - n0, j]
                for p in range(indptr[j], indptr[j + 1]):
                    r = rows[p]
                    value = np.float32(signs[p]) * scale
                    for k in range(b):
                        sums[r, k] += value * tmp[k]
            acc += sums

        @numba.njit(nogil=True, boundscheck=False)
        def by_rows(rows, indptr, cols, signs, scale, x, acc, lo, hi):
            b = x.shape[1]
            s = np.empty(b, np.float32)
            for t in range(lo, hi):
                for k in range(b):
                    s[k] = 0.0
                for p in range(indptr[t], indptr[t + 1]):
                    j = cols[p]
                    value = np.float32(signs[p]) * scale
                    for k in range(b):
                        s[k] += value * x[j, k]
                r = rows[t]
                for k in range(b):
                    acc[r, k] += s[k]

        _KERNELS.update(by_columns=by_columns, by_rows=by_rows)
    return _KERNELS


_TABLES: dict = {}


def _sign_table(scale: float) -> torch.Tensor:
    """(256 × 8) float32: row b holds the 8 values ±scale that the bits of byte b (most significant first) stand
    for. Every value is exactly ±float32(scale), the entries a float32 matrix of the signs times scale holds."""
    if scale not in _TABLES:
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
        _TABLES[scale] = torch.from_numpy(np.where(bits > 0, np.float32(scale), -np.float32(scale)).astype(np.float32))
    return _TABLES[scale]


def _on_one_thread(fn):
    """Run ``fn`` with torch on one thread (so its products are the single-threaded GEMMs whose bits do not
    depend on the machine's thread count), restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


_POOLS: dict = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """The projection threads of this process (keyed by pid too: a forked child cannot use its parent's)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="fisher-projection")
    return _POOLS[key]


def _run_tasks(tasks: list, workers: int) -> None:
    """Run ``tasks`` ((function, args) pairs that release the GIL and write disjoint memory) on the calling
    thread and ``workers - 1`` pool threads, each taking the next task until none is left. The calling
    thread works rather than waits: a pool thread can be slow to get a core right after torch's own
    threads ran (they spin a while before sleeping), and the caller already has one."""
    pending = iter(tasks)
    lock = threading.Lock()

    def drain():
        while True:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            task[0](*task[1])

    helpers = [_pool(workers - 1).submit(drain) for _ in range(min(workers, len(tasks)) - 1)]
    try:
        drain()
    finally:
        for h in helpers:
            h.result()


class ProjectionStack:
    """Several projections applied to one block of features.

    On the CPU sparse members are multiplied by the compiled kernels of :func:`_kernels`: a block at
    least ``dim`` features wide walks the stored columns band of rows by band of rows (reading the
    block as it comes, images × features, when the stack is sparse-only and holds one or two chunks;
    otherwise from one transposed copy), a narrower one a row-major copy of its columns
    (:meth:`SparseProjection.row_major`, the only thing cached, with its splits), in parts
    of about equal work; dense members (density above ``DENSE_ABOVE``) are expanded ``WIDTH`` columns at
    a time into float32 blocks multiplied by one single-threaded GEMM each (per chunk of images, so
    :meth:`accumulate_chunks` expands each block once for all its chunks); the blocks' products are
    summed in a fixed order. So the result does not depend on the thread count (and so on how many
    actors share a node) while the products run on all of torch's threads at once, one per task, and
    memory stays at the stored matrices plus one block per thread. The column walks of one block run as one
    call of the C library on OpenMP threads where it has them (:mod:`fisher.native`), the other tasks on the
    calling thread and a pool of Python threads. (A GEMM run on several threads may split its long inner dimension among them,
    which changes its round-off.) On GPUs the members below density 1 are built once per (offset, width)
    and cached as one torch CSR matrix (cuSPARSE); the density-1 members are kept there as their sign bits
    and expanded piece by piece into float32 for GEMMs, so device memory stays at the stored matrices plus
    ``DEVICE_BYTES`` (the MNIST grid's three density-1 members would take 2.2 GB as floats, a 20 M-feature
    prior's 111 GB).
    """
    WIDTH = 4096
    DEVICE_BYTES = 256 << 20  # float32 bytes of density-1 columns expanded at once on a GPU
    PARALLEL_FROM = 4096     # feature blocks narrower than this are multiplied on the calling thread ...
    PARALLEL_NNZ = 1 << 15   # ... unless a member's non-zeros there, walked by rows, are at least this many

    def __init__(self, projections: list[SparseProjection], c_kernel: bool = True):
        self.projections = list(projections)
        self.c_kernel = c_kernel      # the column walk in C (fisher.native) where it is available: same bits
        self._cache: dict = {}
        self._dense = [i for i, p in enumerate(self.projections) if p.density > DENSE_ABOVE]
        self._sparse = [i for i, p in enumerate(self.projections) if p.density <= DENSE_ABOVE]
        self._dense_rows = sum(self.projections[i].dim for i in self._dense)
        self._bit_members = [i for i, p in enumerate(self.projections) if p._dense]       # on a GPU: expanded from bits
        self._csr_members = [i for i, p in enumerate(self.projections) if not p._dense]    # on a GPU: one CSR matrix

    def project(self, g: torch.Tensor, offset: int = 0) -> list[torch.Tensor]:
        """Contributions (B × dim each) of features ``[offset, offset + g.shape[1])``."""
        return [z.t() for z in self.accumulate(None, g, offset)]

    def accumulate(self, acc: list[torch.Tensor] | None, g: torch.Tensor, offset: int = 0) -> list[torch.Tensor]:
        """Add the contributions of ``g`` (B × m, features ``[offset, offset + m)``) to ``acc`` (one
        (dim × B) tensor per member, changed in place) and return it; ``acc=None`` starts from them.
        Each block's contribution is computed alone and then added, so a sum over a model's layers has
        the same bits however the layers are grouped into calls. (On the CPU a sparse member adds
        nothing to the rows a block does not touch, where adding its +0.0 would only turn a -0.0 of
        ``acc`` into +0.0; sums this class starts never hold -0.0.)"""
        return self.accumulate_chunks(acc, [g], offset)

    def accumulate_chunks(self, acc: list[torch.Tensor] | None, gs: list[torch.Tensor], offset: int = 0
                          ) -> list[torch.Tensor]:
        """:meth:`accumulate` for C chunks of B images at once: ``gs[c]`` holds the features of chunk ``c``, and
        columns ``[c·B, (c+1)·B)`` of each member's (dim × C·B) ``acc`` are its sums. Every element has the
        same bits as with one call per chunk; on the CPU each of a sparse member's non-zeros is applied to
        all C·B images in one pass, and each block of the dense members is expanded once for all chunks
        (the expansion costs about what its product does)."""
        b = gs[0].shape[0]
        if acc is None:
            acc = [None] * len(self.projections)
        if not self.uses_cpu_kernels(gs[0]):
            fresh = [a is None for a in acc]
            for c, g in enumerate(gs):
                for i, z in enumerate(self._project_device(g.t().contiguous().float(), offset)):
                    if fresh[i] and c == 0:
                        acc[i] = torch.empty(z.shape[0], len(gs) * b, dtype=z.dtype, device=z.device)
                    if fresh[i]:
                        acc[i][:, c * b:(c + 1) * b] = z
                    else:
                        acc[i][:, c * b:(c + 1) * b] += z
            return acc
        workers = max(1, torch.get_num_threads())
        if not self._dense:                 # the sparse kernels do not use torch's threads
            return self._accumulate_cpu(acc, gs, offset, workers)
        return _on_one_thread(lambda: self._accumulate_cpu(acc, gs, offset, workers))

    # ------------------------------------------------------------------ CPU
    def _band_task(self, i: int, band: _Band, xs: tuple, offset: int, acc: np.ndarray):
        """Add rows ``[band.row0, band.row1)`` of member ``i``'s contribution to ``acc`` (those rows of its
        running sum), walking its columns over ``xs``: one or two (images × m) arrays, side by side."""
        rows, m, b = band.row1 - band.row0, xs[0].shape[1], acc.shape[1]
        x1 = xs[1] if len(xs) > 1 else xs[0][:0]
        args = (band.indptr[offset:offset + m + 1], band.rows, band.signs, np.float32(self.projections[i].scale),
                xs[0], x1, acc, _scratch("sums", rows * b).view(rows, b).numpy())
        lib = native.kernels() if self.c_kernel else None
        if lib is None or not native.by_columns(lib, *args):
            _kernels()["by_columns"](*args, _scratch("gathered", b).numpy())

    def _walk_together(self, walks: list, xs: tuple, b: int, workers: int) -> bool:
        """The ``_band_task`` s ``walks`` as one call of the C library on ``workers`` OpenMP threads (torch's
        pool, awake after its last operation); False, with nothing done, where that is not available."""
        lib = native.kernels() if self.c_kernel else None
        if lib is None or not lib.openmp:
            return False
        total = sum(band.row1 - band.row0 for _, (_, band, _, _, _) in walks)
        sums, at, args = _scratch("walk sums", total * b).numpy(), 0, []
        for _, (i, band, _, offset, acc) in walks:
            rows, m = band.row1 - band.row0, xs[0].shape[1]
            args.append((band.indptr[offset:offset + m + 1], band.rows, band.signs,
                         np.float32(self.projections[i].scale), acc, sums[at:at + rows * b].reshape(rows, b)))
            at += rows * b
        return native.by_columns_tasks(lib, args, xs[0], xs[1] if len(xs) > 1 else xs[0][:0], workers)

    def _rows_task(self, i: int, rm: _RowMajor, lo: int, hi: int, x: np.ndarray, acc: np.ndarray):
        """Add the rows ``rm.rows[lo:hi]`` of member ``i``'s contribution to ``acc`` (its running sum)."""
        _kernels()["by_rows"](rm.rows, rm.indptr, rm.cols, rm.signs, np.float32(self.projections[i].scale), x, acc,
                              lo, hi)

    def _dense_task(self, k: int, rhs: torch.Tensor, out: torch.Tensor, offset: int, m: int):
        """Block ``k`` of the stacked dense members: expand it, then one GEMM per chunk ``c`` of
        ``rhs[k, :, c]`` into ``out[c, k]``."""
        a = _scratch("block", out.shape[2] * self.WIDTH).view(1, out.shape[2], self.WIDTH)
        start, stop = offset + k * self.WIDTH, offset + min(m, (k + 1) * self.WIDTH)
        if stop - start < self.WIDTH:
            a[0, :, stop - start:] = 0
        row = 0
        for i in self._dense:
            p = self.projections[i]
            p.expand_into(a[0, row:row + p.dim], start, stop)
            row += p.dim
        for c in range(out.shape[0]):
            torch.bmm(a, rhs[k:k + 1, :, c], out=out[c, k:k + 1])

    def _accumulate_cpu(self, acc: list, gs: list[torch.Tensor], offset: int, workers: int) -> list[torch.Tensor]:
        """:meth:`accumulate_chunks` on the CPU: sparse members add straight into their running sums, dense
        ones are summed over their blocks in per-thread scratch memory and then added."""
        (b, m), n_chunks = gs[0].shape, len(gs)
        n_blocks = -(-m // self.WIDTH) if self._dense else 0
        height = n_blocks * self.WIDTH if self._dense else m
        # Wide sparse members read the blocks as they are (up to two chunks); the rest need them transposed.
        gather = n_chunks <= 2 and not self._dense
        transposed = not gather or any(m < self.projections[i].dim for i in self._sparse)
        features = _scratch("features", height * n_chunks * b if transposed else 0).view(-1, n_chunks, b)
        if transposed:
            for c, g in enumerate(gs):            # the chunks side by side, transposed: (m × C × B); for dense
                features[:m, c].copy_(g.t())      # members zero rows up to the block width
            features[m:] = 0
        fresh = [a is None for a in acc]          # sparse sums start at +0.0; dense ones are set below
        acc = [torch.zeros(p.dim, n_chunks * b) if fresh[i] and i in self._sparse else acc[i]
               for i, p in enumerate(self.projections)]
        tasks, split = [], False
        x = features[:m].view(m, n_chunks * b).numpy() if transposed else None
        xs = tuple(_readable(g).numpy() for g in gs) if gather else (x.T,)      # (images × m) each
        for i in self._sparse:
            p = self.projections[i]
            if m < p.dim:                         # narrow layer: by rows, in parts of about equal work
                rm = p.row_major(offset, offset + m)
                parts = rm.split(workers if rm.indptr[-1] * n_chunks >= self.PARALLEL_NNZ else 1)
                split |= len(parts) > 1
                tasks += [(self._rows_task, (i, rm, lo, hi, x, acc[i].numpy())) for lo, hi in parts]
            else:
                tasks += [(self._band_task, (i, band, xs, offset, acc[i][band.row0:band.row1].numpy()))
                          for band in p._bands]
        if self._dense:
            prod = _scratch("products", n_chunks * n_blocks * self._dense_rows * b).view(
                n_chunks, n_blocks, self._dense_rows, b)
            rhs = features.view(n_blocks, self.WIDTH, n_chunks, b)
            tasks += [(self._dense_task, (k, rhs, prod, offset, m)) for k in range(n_blocks)]
        parallel = workers > 1 and len(tasks) > 1 and (m >= self.PARALLEL_FROM or split)
        walks = [t for t in tasks if t[0] == self._band_task]
        if parallel and len(walks) > 1 and self._walk_together(walks, xs, b * n_chunks, workers):
            tasks = [t for t in tasks if t[0] != self._band_task]
        if parallel:
            _run_tasks(tasks, workers)
        else:                                     # small blocks: a task costs more than it saves
            for fn, args in tasks:
                fn(*args)
        if self._dense:
            for c in range(n_chunks):
                z = prod[c].sum(0)
                for i, piece in zip(self._dense, torch.split(z, [self.projections[i].dim for i in self._dense])):
                    if fresh[i] and c == 0:
                        acc[i] = torch.empty(piece.shape[0], n_chunks * b)
                    if fresh[i]:
                        acc[i][:, c * b:(c + 1) * b] = piece
                    else:
                        acc[i][:, c * b:(c + 1) * b] += piece
        return acc

    # ------------------------------------------------------------------ other devices (GPUs)
    @staticmethod
    def uses_cpu_kernels(t: torch.Tensor) -> bool:
        """Whether products with ``t`` run on this module's CPU kernels; elsewhere (a GPU) they are torch's
        own operations on ``t``'s device (:meth:`_project_device`)."""
        return t.device.type == "cpu"

    def _device_csr(self, offset: int, m: int, device) -> torch.Tensor | None:
        """The members not at density 1, columns ``[offset, offset + m)``, stacked as one torch CSR matrix
        on ``device``: built once per (offset, width) and kept (together they are the stored matrices)."""
        idx = self._csr_members
        if not idx:
            return None
        key = ("csr", offset, m, str(device))
        if key not in self._cache:
            mat = sp.vstack([self.projections[i].columns(offset, offset + m) for i in idx]).tocsr()
            itype = torch.int32 if mat.nnz < 2**31 else torch.int64
            with warnings.catch_warnings():           # torch calls its CSR support "beta" on every build
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                self._cache[key] = torch.sparse_csr_tensor(
                    torch.from_numpy(mat.indptr).to(itype), torch.from_numpy(mat.indices).to(itype),
                    torch.from_numpy(mat.data), size=mat.shape, check_invariants=False).to(device)
        return self._cache[key]

    def _device_bits(self, i: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``i`` (density 1) on ``device``: its packed sign bits (dim × n/8 bytes, 1/32 of the float
        matrix) and its (256 × 8) byte-to-values table."""
        key = ("bits", i, str(device))
        if key not in self._cache:
            p = self.projections[i]
            self._cache[key] = (torch.from_numpy(p._bits).to(device), _sign_table(p.scale).to(device))
        return self._cache[key]

    def _project_device(self, gt: torch.Tensor, offset: int) -> list[torch.Tensor]:
        """Every member's (dim × B) contribution of ``gt`` (m × B, features ``[offset, offset + m)``) on
        ``gt``'s device: the other members by one CSR product (cuSPARSE), the density-1 members stacked and
        expanded from their bits ``DEVICE_BYTES`` of float32 at a time, each piece multiplied by one GEMM."""
        m, b = gt.shape
        out: list = [None] * len(self.projections)
        csr = self._device_csr(offset, m, gt.device)
        if csr is not None:
            idx = self._csr_members
            for i, piece in zip(idx, torch.split(csr @ gt, [self.projections[i].dim for i in idx])):
                out[i] = piece
        idx = self._bit_members
        if idx:
            rows = sum(self.projections[i].dim for i in idx)
            width = max(8, self.DEVICE_BYTES // (4 * rows) // 8 * 8)
            z = torch.zeros(rows, b, dtype=gt.dtype, device=gt.device)
            for start in range(0, m, width):
                stop = min(m, start + width)
                lo, hi, shift = (offset + start) // 8, -(-(offset + stop) // 8), (offset + start) % 8
                a = torch.empty(rows, stop - start, dtype=gt.dtype, device=gt.device)
                row = 0
                for i in idx:
                    bits, table = self._device_bits(i, gt.device)
                    dim = self.projections[i].dim
                    vals = table.index_select(0, bits[:, lo:hi].flatten().int()).view(dim, 8 * (hi - lo))
                    a[row:row + dim] = vals[:, shift:shift + stop - start]
                    row += dim
                z.addmm_(a, gt[start:stop])
            for i, piece in zip(idx, torch.split(z, [self.projections[i].dim for i in idx])):
                out[i] = piece
        return out
