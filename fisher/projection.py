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
without touching the zeros. It is stored column-compressed (int32 rows,
one sign bit), never as a dense array, and sliced into per-layer column
blocks so per-layer gradients are projected as they are produced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

BLOCK = 1 << 16          # features per generation block (part of the matrix's definition)
DENSE_ABOVE = 0.25       # densities above this are applied as dense matrices (same values)
MIN_DENSITY = 2.0 ** -40  # the density's resolution in the generator's key: smaller ones are not distinct


def estimated_bytes(n_features: int, dim: int, density: float) -> int:
    """Memory a projection takes: int32 row + int8 sign per non-zero (int8 signs at density 1), plus the
    float32 dense matrix it is applied as above ``DENSE_ABOVE``."""
    stored = n_features * dim if density >= 1.0 else 5 * n_features * dim * density
    return int(stored + (4 * n_features * dim if density > DENSE_ABOVE else 0))


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
    """``P`` of paper eq. 1; ``project(g)`` returns ``g @ P.T`` for rows ``g`` of features."""

    def __init__(self, n_features: int, dim: int, density: float | None = None, seed: int = 0):
        density = validate(n_features, dim, density)
        self.spec = ProjectionSpec(int(n_features), int(dim), density, int(seed))
        self.n_features, self.dim, self.density, self.seed = n_features, dim, density, seed
        self.scale = 1.0 / math.sqrt(density * dim)            # √s / √p
        indptr, rows, signs = [np.zeros(1, np.int64)], [], []
        for b, start in enumerate(range(0, n_features, BLOCK)):
            ncols = min(BLOCK, n_features - start)
            pos, sg = _block_columns(seed, dim, density, b, ncols)
            if pos is None:
                signs.append(sg)
                continue
            col, row = np.divmod(pos, dim)
            counts = np.bincount(col, minlength=ncols)
            indptr.append(indptr[-1][-1] + np.cumsum(counts))
            rows.append(row.astype(np.int32))
            signs.append(sg)
        self._signs = np.concatenate(signs) if signs else np.zeros(0, np.int8)
        self._dense = density >= 1.0     # then _signs is (n, dim): feature i's column of P
        self._indptr = np.concatenate(indptr)                  # CSC over the n columns
        self._rows = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        self._stack: ProjectionStack | None = None

    @property
    def nnz(self) -> int:
        return int(self._signs.size)

    def columns(self, start: int, stop: int) -> sp.csc_matrix | np.ndarray:
        """Columns ``[start, stop)`` of ``P`` (values ±scale): SciPy CSC, or a dense array at density 1."""
        if self._dense:
            return np.ascontiguousarray(self._signs[start:stop].T, dtype=np.float32) * np.float32(self.scale)
        lo, hi = self._indptr[start], self._indptr[stop]
        data = self._signs[lo:hi].astype(np.float32) * np.float32(self.scale)
        return sp.csc_matrix((data, self._rows[lo:hi], self._indptr[start:stop + 1] - lo),
                             shape=(self.dim, stop - start))

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


def _as_operator(blocks: list, dense: bool, device):
    """A stacked column block in the fastest form for ``device``.

    Dense members: a torch matrix. Sparse members on the CPU: SciPy CSC, whose
    product walks the gradient rows once and scatters into the (cache-sized)
    output, about 3x faster here than torch's CSR kernel, which gathers a
    gradient row for every non-zero. On GPUs: torch CSR (cuSPARSE).
    """
    if dense:
        return BlockedDense(torch.from_numpy(np.vstack([b if isinstance(b, np.ndarray) else b.toarray()
                                                        for b in blocks])).to(device))
    m = sp.vstack(blocks)
    if torch.device(device).type == "cpu":
        return m.tocsc()
    m = m.tocsr()
    return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                   torch.from_numpy(m.indices.astype(np.int64)),
                                   torch.from_numpy(m.data), size=m.shape).to(device)


class BlockedDense:
    """A dense (dims × m) matrix applied as a sum of fixed-width column blocks, on one thread.

    A GEMM run on several threads may split its long inner dimension among them, so its round-off
    depends on the thread count (and so on how many actors share a node). Here every product is
    one single-threaded GEMM per 4096-column block and the blocks are added in a fixed order: the
    same bits whatever the thread count. On this 2-core CPU that costs little (a second thread
    sped the plain product up by about 10 %); GPUs keep their own (deterministic) kernels.
    """
    WIDTH = 4096

    def __init__(self, mat: torch.Tensor):
        dims, m = mat.shape
        self.m, self.n_blocks = m, -(-m // self.WIDTH)
        pad = self.n_blocks * self.WIDTH - m
        self.blocks = F.pad(mat, (0, pad)).view(dims, self.n_blocks, self.WIDTH).transpose(0, 1).contiguous()

    def __matmul__(self, gt: torch.Tensor) -> torch.Tensor:
        pad = self.n_blocks * self.WIDTH - self.m
        rhs = F.pad(gt, (0, 0, 0, pad)).view(self.n_blocks, self.WIDTH, gt.shape[1])
        if self.blocks.device.type != "cpu":
            return torch.bmm(self.blocks, rhs).sum(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.bmm(self.blocks, rhs).sum(0)
        finally:
            torch.set_num_threads(threads)


class ProjectionStack:
    """Several projections applied to one block of features in (at most) two products.

    The column blocks of all members are stacked row-wise into one sparse CSR
    matrix (members with density <= ``DENSE_ABOVE``) and one dense matrix
    (denser members); results are split back per member. The stacked blocks
    are cached per (offset, width, device): a model's layer blocks recur
    every batch.
    """

    def __init__(self, projections: list[SparseProjection]):
        self.projections = list(projections)
        self._cache: dict = {}

    def _parts(self, offset: int, m: int, device):
        key = (offset, m, str(device))
        if key not in self._cache:
            cols = [p.columns(offset, offset + m) for p in self.projections]
            parts = []
            for dense in (False, True):
                idx = [i for i, p in enumerate(self.projections) if (p.density > DENSE_ABOVE) == dense]
                if idx:
                    parts.append((idx, _as_operator([cols[i] for i in idx], dense, device)))
            self._cache[key] = parts
        return self._cache[key]

    def project(self, g: torch.Tensor, offset: int = 0) -> list[torch.Tensor]:
        """Contributions (B × dim each) of features ``[offset, offset + g.shape[1])``."""
        out: list = [None] * len(self.projections)
        gt = g.t().contiguous().float()
        for idx, mat in self._parts(offset, g.shape[1], g.device):
            if isinstance(mat, sp.spmatrix):
                z = torch.from_numpy(mat @ gt.numpy()).t()        # (B, sum of member dims)
            else:
                z = (mat @ gt).t()
            for i, piece in zip(idx, torch.split(z, [self.projections[i].dim for i in idx], dim=1)):
                out[i] = piece
        return out
