"""Per-layer score rules on a model the original stride-1 fast path did not cover.

A small down/up-sampling network on 28×28 binary images (strided convs, transposed convs, weight
norm as PixelCNN++ uses it, a conditioning Linear, a 1×1 output conv; Bernoulli head), batch 64,
one thread. Compares, in one run on the same batch:

  scores+proj   fisher.scores.fisher_scores with a 4096-dim projection (per-layer rules)
  scores        fisher.scores.fisher_scores, unprojected
  torch.func    fisher_scores_vmap, chunks of 32 (what every such model took before)
  naive loop    fisher_scores_reference: one backward per image

and prints seconds (median of --reps warm runs) and ratios to scores+proj; then, each method in a
fresh process, the growth of peak resident memory during one cold run (VmHWM after resetting it),
and scores+proj again at 4× the batch (it must not grow). The machine is shared and noisy: read
the ratios.

    python benchmarks/bench_layers.py [--batch 64] [--reps 3] [--threads 1] [--filters 32] [--no-memory]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from fisher.likelihoods import Bernoulli


class UpDown(nn.Module):
    likelihood = Bernoulli(2)

    def __init__(self, f: int = 32):
        super().__init__()
        self.inp = weight_norm(nn.Conv2d(1, f, 3, padding=1))                            # 28
        self.down1 = weight_norm(nn.Conv2d(f, f, 3, stride=2, padding=1))                # 14
        self.down2 = nn.Conv2d(f, 2 * f, 3, stride=2, padding=1)                         # 7
        self.dil = nn.Conv2d(2 * f, 2 * f, 3, dilation=2, padding=2)                     # 7
        self.cond = nn.Linear(2 * f, 2 * f)
        self.up1 = weight_norm(nn.ConvTranspose2d(2 * f, f, 3, stride=2, padding=1, output_padding=1))   # 14
        self.up2 = nn.ConvTranspose2d(f, f, 4, stride=2, padding=1)                      # 28
        self.out = nn.Conv2d(f, 1, 1)

    def forward(self, x):
        h = F.elu(self.inp(x.float() * 2 - 1))
        h = F.elu(self.down1(h))
        d = F.elu(self.down2(h))
        d = F.elu(self.dil(d)) + self.cond(d.mean((2, 3)))[:, :, None, None]
        u = F.elu(self.up1(d)) + h
        return self.out(F.elu(self.up2(u)))

    def log_prob_from_output(self, out, x):
        return self.likelihood.log_prob(out, x).flatten(1).sum(1)

    def log_prob(self, x):
        return self.log_prob_from_output(self(x), x)


def _setup(batch: int, threads: int, filters: int, dim: int):
    from fisher.projection import SparseProjection
    from fisher.scores import fisher_scores, fisher_scores_reference, fisher_scores_vmap, n_features

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UpDown(filters).eval()
    x = torch.randint(0, 2, (batch, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    proj = SparseProjection(n_features(model), dim, seed=0)

    def vmap_chunks():
        return torch.cat([fisher_scores_vmap(model, x[i:i + 32]) for i in range(0, len(x), 32)])

    methods = {
        "scores+proj": lambda: fisher_scores(model, x, proj),
        "scores": lambda: fisher_scores(model, x),
        "torch.func": vmap_chunks,
        "naive loop": lambda: fisher_scores_reference(model, x),
    }
    return model, x, methods


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_child(method: str, batch: int, threads: int, filters: int, dim: int, q) -> None:
    _, _, methods = _setup(batch, threads, filters, dim)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                               # reset VmHWM to the current RSS
    before = _status("VmRSS")
    methods[method]()
    q.put(_status("VmHWM") - before)


def _peak(method: str, batch: int, args) -> int:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(method, batch, args.threads, args.filters, args.dim, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()

    from fisher.scores import n_features, score_plan

    model, x, methods = _setup(args.batch, args.threads, args.filters, args.dim)
    rules = sorted({r for _, r in score_plan(model, x[:2])})
    print(f"{n_features(model)} features, {args.filters} filters, batch {args.batch}, {args.threads} thread(s); "
          f"rules used: {', '.join(rules)}")
    times, results = {}, {}
    for name, fn in methods.items():
        results[name] = fn()                                       # warm-up
        runs = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    ref = results["naive loop"]
    err = float((results["scores"] - ref).norm() / ref.norm())
    base = times["scores+proj"]
    print(f"{'method':<12} {'seconds':>8} {'x scores+proj':>14}")
    for name, t in times.items():
        print(f"{name:<12} {t:8.3f} {t / base:14.2f}")
    print(f"relative error of scores against the naive loop: {err:.2e}")
    if args.no_memory:
        return
    print(f"peak memory growth, one cold run, batch {args.batch}:")
    for name in methods:
        print(f"  {name:<12} {_peak(name, args.batch, args) / 2**20:8.1f} MB")
    grown = _peak("scores+proj", 4 * args.batch, args)
    print(f"  {'scores+proj':<12} {grown / 2**20:8.1f} MB at batch {4 * args.batch}")


if __name__ == "__main__":
    main()
