"""The sparse projection of paper eq. 1 against the sparse products of well-kept libraries.

Takes one chunk of real per-image score blocks (``fisher.scores`` on real test images; default the
paper's MNIST PixelCNN, 32 binarized test images) and projects every block at least ``dim`` features
wide (the layers that carry almost all features) with the 16384-dim matrix at density 1/sqrt(n), four
ways, in turn, in one process:

  fisher        ProjectionStack.accumulate, what fisher_scores runs (compiled kernels, 2 threads; the
                column walk in C where a compiler exists, fisher.native)
  fisher, Numba the same with the Numba kernel only (FISHER_NATIVE=0, or no compiler)
  torch (MKL)   torch.sparse.mm of the block's CSR columns with the block already transposed
  scipy         SciPy's CSR product, likewise
  transpose     the (images x features) -> (features x images) copy the library calls need, alone

The libraries are handed the transposed block and their CSR matrices for free; ``fisher`` is timed
from the block as ``fisher_scores`` yields it. Prints the median milliseconds per chunk over
``--reps`` rounds and each way over ``fisher``, and checks that ``fisher`` gives the bits of SciPy's
column-compressed product and that MKL's result agrees to round-off.

    python benchmarks/bench_projection.py [--prior builtin:mnist-pixelcnn] [--images 32] [--reps 7]
"""
from __future__ import annotations

import argparse
import warnings
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", default="pixelcnn", help="a family (untrained) or builtin:NAME / a prior directory")
    ap.add_argument("--dataset", choices=["mnist", "celeba"], default="mnist")
    ap.add_argument("--config", default=None, help="JSON options of the family")
    ap.add_argument("--images", type=int, default=32, help="one chunk of this many images")
    ap.add_argument("--dim", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import json
    import scipy.sparse as sp
    from bench_scores import SHARED, _celeba_images, _images, _model
    from fisher import scores as S
    from fisher.projection import ProjectionStack, SparseProjection
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse")       # torch: CSR support is "beta"
    if args.dataset == "celeba":
        src, levels = _celeba_images(str(SHARED.parent / "celeba"), 32, 5)
        channels = 3
    else:
        src, levels, channels = str(SHARED), 2, 1
    model = _model(args.prior, channels, levels, json.loads(args.config) if args.config else None).eval()
    x = torch.from_numpy(_images(src, args.images)).permute(0, 3, 1, 2).float()
    n = S.n_features(model)
    proj = SparseProjection(n, args.dim)
    stack, numba_only = ProjectionStack([proj]), ProjectionStack([proj], c_kernel=False)
    blocks = [(o, g) for o, g in S._blocks(model, S._make_plan(model), S._standard_strides(x)) if g.shape[1] >= args.dim]
    if not blocks:
        raise SystemExit(f"no score block of {args.prior} is {args.dim} features wide; pass a smaller --dim")
    csr = [proj.columns(o, o + g.shape[1]).tocsr() for o, g in blocks]
    mkl = [torch.sparse_csr_tensor(torch.from_numpy(c.indptr.astype(np.int64)), torch.from_numpy(c.indices.astype(np.int64)),
                                   torch.from_numpy(c.data), size=c.shape) for c in csr]
    gts = [g.t().contiguous() for _, g in blocks]
    ways = {
        "fisher": lambda: [stack.accumulate(None, g, o) for o, g in blocks],
        "fisher, Numba": lambda: [numba_only.accumulate(None, g, o) for o, g in blocks],
        "torch (MKL)": lambda: [torch.sparse.mm(m, gt) for m, gt in zip(mkl, gts)],
        "scipy": lambda: [c @ gt.numpy() for c, gt in zip(csr, gts)],
        "transpose": lambda: [g.t().contiguous() for _, g in blocks],
    }
    ours = [z[0] for z in ways["fisher"]()]
    bits = all(torch.equal(a.view(torch.int32), z[0].view(torch.int32)) for a, z in zip(ours, ways["fisher, Numba"]()))
    bits &= all(torch.equal(a.view(torch.int32), torch.from_numpy(sp.csc_matrix(c) @ gt.numpy()).view(torch.int32))
               for a, c, gt in zip(ours, csr, gts))
    close = all(torch.allclose(a, m, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
                for a, m in zip(ours, ways["torch (MKL)"]()))
    times = {k: [] for k in ways}
    for _ in range(args.reps):
        for k, f in ways.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    nnz = sum(int(c.nnz) for c in csr)
    print(f"{args.prior}: {len(blocks)} blocks >= {args.dim} wide, {sum(g.shape[1] for _, g in blocks)} of {n} features, "
          f"{nnz} non-zeros, {args.images} images, {args.threads} threads, median of {args.reps} rounds (pid {os.getpid()})")
    base = statistics.median(times["fisher"])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:13s} {med * 1e3:8.1f} ms   x fisher {med / base:5.2f}")
    print(f"fisher bitwise = its Numba kernel = SciPy's CSC product: {bits}; MKL agrees to round-off: {close}")
    if not (bits and close):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
