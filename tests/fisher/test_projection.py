"""Paper eq. 1 (Li et al. 2006): values, density, sign balance, norms, determinism."""
import itertools
import math
import os
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fisher.io import FisherError
from fisher.projection import BLOCK, ProjectionStack, SparseProjection


def test_entries_follow_eq1():
    n, p, d = 20_000, 256, 0.01
    P = SparseProjection(n, p, density=d, seed=3).dense().numpy()
    nz = P[P != 0]
    scale = math.sqrt(1 / d) / math.sqrt(p)
    assert np.allclose(np.abs(nz), scale, rtol=1e-6)                # values are ±√s/√p
    total = n * p
    # empirical density within 5 standard deviations of d
    assert abs(nz.size / total - d) < 5 * math.sqrt(d * (1 - d) / total)
    pos = (nz > 0).sum()
    assert abs(pos / nz.size - 0.5) < 5 * 0.5 / math.sqrt(nz.size)  # sign balance
    # each column's count is Binomial(p, d): mean and variance match
    counts = (P != 0).sum(0)
    assert abs(counts.mean() - p * d) < 0.05 * p * d
    assert abs(counts.var() / (p * d * (1 - d)) - 1) < 0.1


def test_density_one_is_dense_signs():
    P = SparseProjection(2000, 64, 1.0, seed=0).dense().numpy()
    assert np.all(np.abs(P) == np.float32(1 / 8))
    assert abs((P > 0).mean() - 0.5) < 0.01


def test_default_density_is_inverse_sqrt_n():
    P = SparseProjection(10_000, 64)
    assert P.density == pytest.approx(1 / 100)


def test_norm_preservation_jl():
    torch.manual_seed(0)
    n, p = 50_000, 4096
    P = SparseProjection(n, p, seed=1)                 # density 1/sqrt(n)
    g = torch.randn(64, n)
    ratio = P.project(g).norm(dim=1) ** 2 / g.norm(dim=1) ** 2
    assert abs(float(ratio.mean()) - 1) < 0.02
    assert float(ratio.std()) < 4 * math.sqrt(2 / p) + 0.01


def test_pure_function_of_seed_n_dim_density():
    a = SparseProjection(3 * BLOCK // 2, 32, 0.01, seed=7)
    b = SparseProjection(3 * BLOCK // 2, 32, 0.01, seed=7)
    c = SparseProjection(3 * BLOCK // 2, 32, 0.01, seed=8)
    ca, cb, cc = (p.columns(0, p.n_features) for p in (a, b, c))
    assert (ca != cb).nnz == 0 and (ca != cc).nnz > 0
    d1, d2 = SparseProjection(3 * BLOCK // 2, 8, 1.0, seed=7), SparseProjection(3 * BLOCK // 2, 8, 1.0, seed=7)
    assert torch.equal(d1.dense(), d2.dense())


def test_blockwise_projection_equals_full_and_dense():
    torch.manual_seed(0)
    n = 5000
    P = SparseProjection(n, 50, 0.2, seed=0)
    g = torch.randn(7, n, dtype=torch.float64).float()
    full = P.project(g)
    parts = P.project(g[:, :1234]) + P.project(g[:, 1234:], offset=1234)
    dense = g @ P.dense().t()
    assert torch.allclose(full, parts, atol=1e-5)
    assert torch.allclose(full, dense, atol=1e-5)


def test_stack_matches_members():
    torch.manual_seed(0)
    n = 3000
    members = [SparseProjection(n, d, dens, seed=0) for d in (8, 16) for dens in (0.01, 1.0)]
    stack = ProjectionStack(members)
    g = torch.randn(9, n)
    for zs, m in zip(stack.project(g), members):
        assert torch.allclose(zs, m.project(g), atol=1e-5)
        assert torch.allclose(zs, g @ m.dense().t(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    with pytest.raises(FisherError, match="density"):
        SparseProjection(100, 10, density)


def test_bad_dim():
    with pytest.raises(FisherError, match="dim"):
        SparseProjection(100, 0)


@pytest.mark.parametrize("n", [3000, 20000])           # one column block, and several
def test_dense_product_does_not_depend_on_the_thread_count(n):
    """Density 1 (dense signs): the same bits with 1, 2 or 3 threads, so embeddings do not depend on how
    many actors share a node (a multi-threaded GEMM may split its long inner dimension across threads)."""
    import torch
    before = torch.get_num_threads()
    p = SparseProjection(n, 64, 1.0, seed=3)
    stack = ProjectionStack([p])
    g = torch.randn(32, n, generator=torch.Generator().manual_seed(0))
    out = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out.append(stack.project(g)[0])
            assert torch.get_num_threads() == threads        # restored after the product
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.allclose(out[0], g @ p.dense().t(), rtol=1e-4, atol=1e-3)


def _old_stack_product(members, g: torch.Tensor, offset: int) -> list[torch.Tensor]:
    """The products as ProjectionStack computed them before it streamed (the reference for 'bitwise
    unchanged'): sparse members stacked into one SciPy CSC; dense ones (density > 0.25) held whole as float32
    and applied as single-threaded GEMMs over 4096-column blocks, summed in order."""
    import scipy.sparse as sp
    import torch.nn.functional as F
    m = g.shape[1]
    gt = g.t().contiguous().float()
    out = [None] * len(members)
    cols = [p.columns(offset, offset + m) for p in members]
    for dense in (False, True):
        idx = [i for i, p in enumerate(members) if (p.density > 0.25) == dense]
        if not idx:
            continue
        if not dense:
            z = torch.from_numpy(sp.vstack([cols[i] for i in idx]).tocsc() @ gt.numpy()).t()
        else:
            mat = torch.from_numpy(np.vstack([c if isinstance(c, np.ndarray) else c.toarray()
                                              for c in (cols[i] for i in idx)]))
            nb = -(-m // 4096)
            blocks = F.pad(mat, (0, nb * 4096 - m)).view(mat.shape[0], nb, 4096).transpose(0, 1).contiguous()
            rhs = F.pad(gt, (0, 0, 0, nb * 4096 - m)).view(nb, 4096, gt.shape[1])
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                z = torch.bmm(blocks, rhs).sum(0).t()
            finally:
                torch.set_num_threads(threads)
        for i, piece in zip(idx, torch.split(z, [members[i].dim for i in idx], dim=1)):
            out[i] = piece
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)          # bit patterns: -0.0 and +0.0 differ, as do NaNs


def test_streamed_stack_is_bitwise_the_whole_matrix_product():
    """Dense members are expanded block by block from their sign bits, sparse ones multiplied by the compiled
    kernels (by columns, and by rows where the block is narrower than the member), on several threads: the same bits (sign of zero included) as holding every matrix whole (what the
    stack did before), for feature ranges that start off a byte and span several 4096-column blocks, and
    for a running sum over blocks (gradients with exact zeros of both signs, as masked and dead units give)."""
    n = 3 * BLOCK // 2 + 5
    members = [SparseProjection(n, d, dens, seed=2) for d in (24, 100) for dens in (0.001, 0.01, 0.5, 1.0)]
    members.append(SparseProjection(n, 12_000, 0.002, seed=2))      # wider than the blocks: walked by rows, on 2 threads
    g = torch.randn(16, 9003, generator=torch.Generator().manual_seed(1))
    g[:, ::7] = 0.0
    g[:, 3::11] = -0.0
    g[3] = -0.0                                      # an image whose whole score is -0.0
    stack = ProjectionStack(members)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for offset in (0, 13, BLOCK - 4000):
            got, want = stack.project(g, offset), _old_stack_product(members, g, offset)
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))
        acc, want = None, None
        for offset, width in ((0, 9003), (9003, 40), (9043, 1), (9044, 5000)):     # layers of a model, in order
            acc = stack.accumulate(acc, g[:, :width], offset)
            parts = [z.t() for z in _old_stack_product(members, g[:, :width], offset)]
            want = [z.clone() for z in parts] if want is None else [w.add_(z) for w, z in zip(want, parts)]
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(acc, want))
    finally:
        torch.set_num_threads(before)


def test_density_one_stores_one_bit_per_entry():
    n, dim = 20_001, 64
    p = SparseProjection(n, dim, 1.0)
    assert p.stored_bytes() == dim * -(-n // 8)
    assert SparseProjection(n, dim, 0.01).stored_bytes() < 5 * n * dim * 0.01 * 1.1 + 2 * 4 * (n + 1)


def _block_with_zeros(images: int) -> torch.Tensor:
    """A block of 9 003 features whose values include zeros of both signs."""
    g = torch.randn(images, 9003, generator=torch.Generator().manual_seed(2))
    g[:, ::7] = 0.0
    g[:, 3::11] = -0.0
    return g


def test_sparse_stack_reads_wide_blocks_untransposed_bitwise(monkeypatch):
    """A sparse-only stack reads a block at least a member's ``dim`` wide as it comes, (images × features) for
    one or two chunks, gathering each column's values in the kernel instead of transposing the block; three
    chunks, and narrower members, take the transposed walks. Every way gives the bits of the whole-matrix
    product, chunk by chunk, for single blocks and for a running sum over a model's blocks."""
    n = 3 * BLOCK // 2 + 5
    members = [SparseProjection(n, 24, 0.01, seed=3), SparseProjection(n, 100, 0.001, seed=4),
               SparseProjection(n, 12_000, 0.002, seed=5)]
    g = _block_with_zeros(48)
    g[5] = -0.0
    walks = []
    real_band, real_rows, real_together = (ProjectionStack._band_task, ProjectionStack._rows_task,
                                           ProjectionStack._walk_together)

    def band(self, i, b, xs, *rest):                  # which layout the column walk reads
        walks.append("untransposed" if xs[0].flags.c_contiguous else "transposed")
        return real_band(self, i, b, xs, *rest)

    def together(self, tasks, xs, *rest):             # the same, for the walks run as one call
        walks.append("untransposed" if xs[0].flags.c_contiguous else "transposed")
        return real_together(self, tasks, xs, *rest)
    monkeypatch.setattr(ProjectionStack, "_band_task", band)
    monkeypatch.setattr(ProjectionStack, "_walk_together", together)
    monkeypatch.setattr(ProjectionStack, "_rows_task", lambda self, *a: (walks.append("rows"), real_rows(self, *a)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for stack in (ProjectionStack(members[:2]), ProjectionStack(members)):
            for n_chunks in (1, 2, 3):
                acc, want = None, None
                for offset, width in ((0, 9003), (9003, 40), (BLOCK - 4000, 5000)):
                    gs = [g[c * 16:(c + 1) * 16, :width] for c in range(n_chunks)]     # rows 9003 apart: not contiguous
                    walks.clear()
                    acc = stack.accumulate_chunks(acc, gs, offset)
                    wide = {i for i, p in enumerate(stack.projections) if width >= p.dim}
                    assert ("untransposed" in walks) == (n_chunks <= 2 and bool(wide))
                    assert ("transposed" in walks) == (n_chunks > 2 and bool(wide))
                    per_chunk = [_old_stack_product(stack.projections, gc, offset) for gc in gs]
                    parts = [torch.cat([z[i].t() for z in per_chunk], 1) for i in range(len(stack.projections))]
                    want = [z.clone() for z in parts] if want is None else [w.add_(z) for w, z in zip(want, parts)]
                    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(acc, want))
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler on this machine")
def test_c_column_walk_is_bitwise_the_numba_kernel():
    """The C kernel (fisher.native) against the Numba one it replaces, on the same arrays: chunk sizes with an
    unrolled loop (16, 32, 64) and without (8, 48 = 32 + 16 in two blocks, and 8 200, more than a tile of
    gathered values holds), blocks read as they come (tiles of columns gathered, or columns one by one where
    a tile is too sparse) and transposed, values and running sums holding zeros of both signs. Where a C
    compiler exists the library must build (a broken build would otherwise only be slower)."""
    from fisher import native
    from fisher.projection import _kernels
    lib = native.kernels()
    assert lib is not None
    p = SparseProjection(3 * BLOCK // 2 + 5, 1000, 0.01, seed=7)
    sparse = SparseProjection(3 * BLOCK // 2 + 5, 1000, 1e-4, seed=7)     # tiles of columns too sparse to gather
    rows, (offset, m) = p._bands[1].row1 - p._bands[1].row0, (13, 9003)
    rng = np.random.default_rng(3)
    for (n0, n1), transposed, q in itertools.product(((8, 0), (16, 0), (32, 0), (64, 0), (32, 16), (16, 16)),
                                                     (False, True), (p, sparse)):
        band, xs = q._bands[1], []
        for n in (n0, n1):
            x = rng.standard_normal((n, m)).astype(np.float32)
            x[:, ::7], x[:, 3::11] = 0.0, -0.0
            xs.append(np.ascontiguousarray(x.T).T if transposed else x)
        start = rng.standard_normal((rows, n0 + n1)).astype(np.float32)
        start[::5] = -0.0
        got, want = start.copy(), start.copy()
        args = (band.indptr[offset:offset + m + 1], band.rows, band.signs, np.float32(q.scale), xs[0], xs[1])
        assert native.by_columns(lib, *args, got, np.empty_like(got))
        _kernels()["by_columns"](*args, want, np.empty_like(want), np.empty(n0 + n1, np.float32))
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), (n0, n1, transposed, q.density)
    band = p._bands[1]
    x = rng.standard_normal((8200, 40)).astype(np.float32)       # more images than a tile holds values: 1 column
    args = (band.indptr[offset:offset + 41], band.rows, band.signs, np.float32(p.scale), x, x[:0])
    got, want = np.zeros((rows, 8200), np.float32), np.zeros((rows, 8200), np.float32)
    assert native.by_columns(lib, *args, got, np.empty_like(got))
    _kernels()["by_columns"](*args, want, np.empty_like(want), np.empty(8200, np.float32))
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler on this machine")
def test_column_walks_on_openmp_threads_are_bitwise_the_pool(monkeypatch):
    """The bands of every wide member walked in one C call on OpenMP threads (where the compiler has OpenMP,
    as gcc here does) give the bits of the same walks run one per thread-pool task, for one and two chunks."""
    from fisher import native
    assert native.kernels().openmp == (subprocess.run([os.environ.get("CC") or "cc", "-fopenmp", "-x", "c", "-",
                                                       "-o", os.devnull], input="int main(void){return 0;}",
                                                      text=True, capture_output=True).returncode == 0)
    members = [SparseProjection(3 * BLOCK // 2 + 5, d, 0.01, seed=d) for d in (900, 4000)]
    g = torch.randn(64, 9003, generator=torch.Generator().manual_seed(4))
    g[:, ::7] = -0.0
    real = ProjectionStack._walk_together
    calls = []

    def spy(self, *a):
        calls.append(real(self, *a))
        return calls[-1]
    monkeypatch.setattr(ProjectionStack, "_walk_together", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for gs in ([g[:32]], [g[:32], g[32:]]):
            calls.clear()
            together = ProjectionStack(members).accumulate_chunks(None, gs, 100)
            assert calls == [native.kernels().openmp]
            monkeypatch.setattr(ProjectionStack, "_walk_together", lambda self, *a: False)
            pool = ProjectionStack(members).accumulate_chunks(None, gs, 100)
            monkeypatch.setattr(ProjectionStack, "_walk_together", spy)
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(together, pool))
    finally:
        torch.set_num_threads(before)


def test_blocks_stored_features_major_are_read_in_place_with_the_same_bits(monkeypatch):
    """A block stored features-major (each feature's B values side by side, as fisher.scores stores the
    per-offset conv blocks it projects) gives, in every stack (sparse members wider and narrower than the
    block, dense members; one and two chunks; the C and the Numba column walks), the bits the same values
    give stored images-major, and a sparse-only stack's column walks read it where it is, uncopied."""
    n = 3 * BLOCK // 2 + 5
    members = [SparseProjection(n, 24, 0.01, seed=3), SparseProjection(n, 12_000, 0.002, seed=5),
               SparseProjection(n, 40, 1.0, seed=6)]
    g = _block_with_zeros(32)
    read = []
    real_band, real_together = ProjectionStack._band_task, ProjectionStack._walk_together
    monkeypatch.setattr(ProjectionStack, "_band_task", lambda self, i, b, xs, *rest: (
        read.append([x.ctypes.data for x in xs]), real_band(self, i, b, xs, *rest))[1])
    monkeypatch.setattr(ProjectionStack, "_walk_together", lambda self, tasks, xs, *rest: (
        read.append([x.ctypes.data for x in xs]), real_together(self, tasks, xs, *rest))[1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for kept, c_kernel, n_chunks in itertools.product((members[:2], members), (True, False), (1, 2)):
            rows_major = [g[c * 16:(c + 1) * 16] for c in range(n_chunks)]
            features_major = [r.t().contiguous().t() for r in rows_major]
            assert not any(f.is_contiguous() for f in features_major)
            want = ProjectionStack(kept, c_kernel).accumulate_chunks(None, rows_major, 500)
            read.clear()
            got = ProjectionStack(kept, c_kernel).accumulate_chunks(None, features_major, 500)
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))
            if len(kept) == 2:                     # the wide member's walks read the blocks themselves
                assert read and all(r == [f.data_ptr() for f in features_major] for r in read)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler on this machine")
def test_c_transpose_is_the_transpose(monkeypatch):
    """native.transposed (the tiled transpose fisher.scores stores blocks features-major with) copies x.t()
    bit for bit: shapes that are and are not multiples of its 8 × 8 squares and 64 × 64 tiles, a source whose
    rows lie further apart than its width, a destination inside a wider matrix (nothing else written), 1 and
    2 threads, zeros of both signs and NaNs; in this machine's build, in a portable build (no AVX: the scalar
    loop) and with the library off (torch's copy)."""
    from fisher import native
    gen = torch.Generator().manual_seed(0)
    sources = []
    for rows, cols in ((1, 1), (7, 13), (8, 8), (64, 64), (65, 130), (192, 1000), (3, 200)):
        big = torch.randn(rows, cols + 5, generator=gen)
        big[::3, ::5], big[1::4, 2::7] = -0.0, float("nan")
        sources.append(big[:, 2:2 + cols])

    def check():
        for x in sources:
            want = x.t().contiguous().view(torch.int32)
            for threads in (1, 2):
                got = native.transposed(x, threads)
                assert got.is_contiguous() and torch.equal(got.view(torch.int32), want)
                wide = torch.full((x.shape[1], x.shape[0] + 3), 7.0)
                assert native.transposed(x, threads, wide[:, 1:-2]).data_ptr() == wide[:, 1:-2].data_ptr()
                assert torch.equal(wide[:, 1:-2].contiguous().view(torch.int32), want)
                assert bool((wide[:, 0] == 7).all() and (wide[:, -2:] == 7).all())

    assert native.kernels() is not None
    check()
    portable = [f for f in native.FLAGS if not f.startswith("-m")]
    if platform.machine().lower() in ("x86_64", "amd64"):
        portable.append("-mno-avx")
    monkeypatch.setitem(native._STATE, "lib", native._load(native._compile(os.environ.get("CC") or "cc", portable)))
    check()
    monkeypatch.setitem(native._STATE, "lib", None)
    check()


def test_c_kernel_can_be_turned_off(monkeypatch):
    from fisher import native
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("FISHER_NATIVE", "0")
    assert native.kernels() is None


def _off_the_cpu_kernels(monkeypatch):
    """Run the products a GPU runs (torch's CSR and GEMM, density-1 members expanded from their bits on the
    device) on CPU tensors, so CI checks the code a GPU executes."""
    monkeypatch.setattr(ProjectionStack, "uses_cpu_kernels", staticmethod(lambda t: False))


def test_device_path_matches_the_cpu_kernels_and_holds_only_the_bits(monkeypatch):
    """The GPU path gives the same projections as the CPU kernels (round-off aside) for members of every
    kind, feature ranges that start off a byte, and density-1 columns expanded in many pieces; what it keeps
    on the device for density-1 members is their sign bits and value table, never a float matrix."""
    n = BLOCK + 3001
    members = [SparseProjection(n, d, dens, seed=5) for d in (24, 100) for dens in (0.001, 0.5, 1.0)]
    members.append(SparseProjection(n, 40, None, seed=5))
    g = torch.randn(9, 7001, generator=torch.Generator().manual_seed(2))
    cpu = ProjectionStack(members)
    want = {offset: cpu.project(g, offset) for offset in (0, 13, BLOCK - 4000)}
    _off_the_cpu_kernels(monkeypatch)
    monkeypatch.setattr(ProjectionStack, "DEVICE_BYTES", 4 * 124 * 1000)        # pieces of 1000 columns
    dev = ProjectionStack(members)
    for offset, w in want.items():
        got = dev.project(g, offset)
        for a, b, p in zip(got, w, members):
            exact = g.double() @ p.dense()[:, offset:offset + g.shape[1]].double().t()
            assert torch.allclose(a.double(), exact, rtol=1e-5, atol=1e-4 * float(exact.abs().max()))
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()))
    held = [t for key, v in dev._cache.items() if key[0] == "bits" for t in v]
    assert sum(t.numel() * t.element_size() for t in held) == sum(
        p._bits.nbytes + 256 * 8 * 4 for p in members if p.density == 1.0)
    assert all(t.dtype == torch.uint8 for t in held[::2])


def test_device_path_sums_layers_like_the_cpu(monkeypatch):
    """accumulate_chunks on the GPU path: running sums over a model's layers, several chunks at once."""
    n = 12_000
    members = [SparseProjection(n, 32, None, seed=1), SparseProjection(n, 16, 1.0, seed=1)]
    g = torch.randn(8, n, generator=torch.Generator().manual_seed(3))
    layers = ((0, 5000), (5000, 40), (5040, 6960))
    want = [g @ p.dense().t() for p in members]
    _off_the_cpu_kernels(monkeypatch)
    stack, acc = ProjectionStack(members), None
    for offset, width in layers:
        acc = stack.accumulate_chunks(acc, [g[:4, offset:offset + width], g[4:, offset:offset + width]], offset)
    for a, w in zip(acc, want):
        assert torch.allclose(a.t(), w, rtol=1e-5, atol=1e-4 * float(w.abs().max()))
