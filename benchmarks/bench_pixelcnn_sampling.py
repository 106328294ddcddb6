"""Sampling the conditional PixelCNN decoder: the cached sampler against the naive loop.

Decodes embeddings to 32×32×3 images of 32 levels (5-bit CelebA, paper sec. 5.2) with the decoder at
its default size (5 gated layers, 120 filters, kernel 7; untrained weights: the cost does not depend on
them), for each ``--filters`` given:

  cached   PixelCNNDecoder.sample on --n images, in batches of --batch (one row cache for the
           vertical stack, one column window per layer and colour for the horizontal stack)
  naive    the full network rerun on the whole image for each of the H·W·C sub-pixels, the same
           inverse CDF: timed for --naive-steps steps on --naive-n images; every step is one full
           forward pass of the same cost, so the time is extrapolated to H·W·C steps, per image

and prints seconds per 1000 images (cached: measured on --n images, extrapolated to 1000 when --n is
smaller) and the ratio. The machine is shared and noisy: read the ratio.

    python benchmarks/bench_pixelcnn_sampling.py                       # 1000 images, filters 120
    python benchmarks/bench_pixelcnn_sampling.py --n 200 --filters 120,32 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch


def _decoder(args, filters: int):
    from fisher.decoders import build_decoder
    torch.manual_seed(0)
    shape = (args.size, args.size, args.channels)
    dec = build_decoder("pixelcnn", args.z_dim, shape, args.levels, layers=args.layers, filters=filters,
                        kernel=args.kernel)
    return dec.eval()


def cached_seconds(dec, z: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for chunk in z.split(batch):
        dec.sample(chunk)
    return time.perf_counter() - start


@torch.no_grad()
def naive_seconds_per_image(dec, z: torch.Tensor, steps: int) -> float:
    """The naive loop's first ``steps`` sub-pixel steps, extrapolated to all H·W·C of them, per image."""
    from fisher.priors.gated import inverse_cdf
    h, w, c = dec.image_shape
    cond, u = dec.standardize(z), torch.rand(len(z), c, h, w)
    x = torch.zeros(len(z), c, h, w, dtype=torch.long)
    start = time.perf_counter()
    for step in range(steps):
        i, j, k = step // (w * c), step // c % w, step % c
        x[:, k, i, j] = inverse_cdf(dec.likelihood, dec.net(x, cond), u)[:, k, i, j]
    return (time.perf_counter() - start) / steps * (h * w * c) / len(z)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="images the cached sampler decodes")
    ap.add_argument("--batch", type=int, default=1000, help="images per sample() call")
    ap.add_argument("--naive-n", type=int, default=8, help="images the naive loop decodes")
    ap.add_argument("--naive-steps", type=int, default=3, help="naive sub-pixel steps timed (then extrapolated)")
    ap.add_argument("--filters", default="120", help="comma-separated filter counts (paper: 120)")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--levels", type=int, default=32)
    ap.add_argument("--z-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{args.size}x{args.size}x{args.channels} images, {args.levels} levels, {args.layers} layers, "
          f"kernel {args.kernel}, {args.threads} thread(s); cached on {args.n} images (batch {args.batch}), "
          f"naive: {args.naive_steps} of {args.size * args.size * args.channels} steps on {args.naive_n} "
          "images, extrapolated")
    print(f"{'filters':>7} {'cached s/1000':>14} {'naive s/1000':>14} {'naive/cached':>13}")
    for filters in (int(f) for f in args.filters.split(",")):
        dec = _decoder(args, filters)
        z = torch.randn(args.n, args.z_dim, generator=torch.Generator().manual_seed(0))
        dec.fit_input(z)
        dec.sample(z[:2])                                                  # warm-up
        cached = cached_seconds(dec, z, args.batch) / args.n * 1000
        naive = naive_seconds_per_image(dec, z[:args.naive_n], args.naive_steps) * 1000
        print(f"{filters:>7} {cached:14.1f} {naive:14.0f} {naive / cached:13.0f}", flush=True)


if __name__ == "__main__":
    main()
