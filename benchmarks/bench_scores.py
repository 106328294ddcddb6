"""Per-sample Fisher scores: speed and memory against the obvious approaches.

All numbers come from one run on the same batch of real test images (binarized
MNIST, or CelebA as `fisher prepare` makes it) for each prior given (default: the
paper's 5-layer MNIST PixelCNN, kernel 7, 64 filters):

  train step      one plain batched step: forward + backward of the summed NLL
  naive loop      one backward per image (the slow reference)
  torch.func      vmap(grad) over the batch (what most users reach for)
  scores          fisher.scores.fisher_scores, unprojected [B, n_features]
  scores+proj     ... with the 16384-dim projection at density 1/sqrt(n)
  grid (12)       the paper's 12 density x dimension cells from one pass
  memory check    scores+proj at 4x the batch: peak memory must not grow

Each method runs in a fresh process: a cold run gives its peak memory (growth
of the resident set, VmHWM after resetting it, caches included; on CUDA the
growth of allocated device memory), warm runs its time. Then each method is
timed alternating with the train step, the two in a process of their own,
--rounds times: the paired ratios, each round's time over that round's step
(the machine's speed drifts for minutes). Then Ray Data
embedding throughput (`fisher embed`, one actor, Ray already started) against
the same work in-process, two ways: the Embedder alone on images already in
memory, warm (the strict bound), and the whole job in a fresh process
(imports, prior, projection, reading and writing the shards; its shards must
equal Ray's byte for byte). Every process sets glibc's malloc as the embed
actors do (fisher.malloc.keep_freed_memory; --default-malloc leaves glibc's
defaults). Ratios are what to read; this machine is shared and noisy.

    python benchmarks/bench_scores.py                  # everything (~10 min on 2 cores)
    python benchmarks/bench_scores.py --skip-ray --batch 64
    python benchmarks/bench_scores.py --skip-ray --dataset celeba \
        --prior builtin:celeba32-pixelcnn,builtin:celeba32-gated,builtin:celeba32-pyramid
    python benchmarks/bench_scores.py --skip-ray --device cuda      # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
GRID_DIMS, GRID_DENSITIES = (64, 256, 1024), (0.001, 0.01, 0.1, 1.0)
SKIPPABLE = ("naive loop", "torch.func", "scores", "scores+proj", "grid (12)")   # the methods beside the step
DEFAULT_MALLOC = "FISHER_BENCH_DEFAULT_MALLOC"    # set: the method processes keep glibc's malloc defaults


def _images(src: str, n: int):
    """``n`` real test images (N, H, W, C) uint8: binarized MNIST from the idx files in ``src``, or the
    prepared images in ``src/images.npy`` (written by :func:`_celeba_images`)."""
    if os.path.exists(os.path.join(src, "images.npy")):
        images = np.load(os.path.join(src, "images.npy"))
        return np.concatenate([images] * -(-n // len(images)))[:n]
    from fisher.data import binarize, load_mnist_split
    grey, _ = load_mnist_split(src, "test", limit=n)
    return binarize(grey, seed=0, split="test")[..., None]


def _celeba_images(src: str, size: int, bits: int) -> tuple[str, int]:
    """The real CelebA test split as the run prepares it (crop, ``size``², ``bits`` bits), saved as
    ``images.npy`` in a temporary folder; returns (folder, levels). A ``src`` that holds ``images.npy``
    already (one an earlier run saved, carried to a GPU machine without the raw images) is used as it is."""
    from fisher.data import CelebaConfig, load_prepared, prepare_celeba
    if os.path.exists(os.path.join(src, "images.npy")):
        return src, 2 ** bits
    tmp = tempfile.mkdtemp(prefix="bench-celeba-")
    prepare_celeba(CelebaConfig(src=src, size=size, bits=bits), f"{tmp}/data", log=lambda _: None)
    np.save(f"{tmp}/images.npy", load_prepared(f"{tmp}/data", "test")["image"])
    return tmp, 2 ** bits


def _model(prior: str, channels: int, levels: int, config: dict | None):
    """A registered family with ``config`` (untrained; timing does not depend on the weights), or a trained
    prior (``builtin:NAME`` or a directory)."""
    from fisher.priors import build_prior, load_prior
    if prior.startswith("builtin:") or os.path.isdir(prior):
        return load_prior(prior)
    return build_prior(prior, channels=channels, levels=levels, **(config or {}))


def _rss_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _malloc() -> None:
    """glibc's malloc as a `fisher embed` actor sets it (fisher.malloc), unless --default-malloc."""
    if not os.environ.get(DEFAULT_MALLOC):
        from fisher.malloc import keep_freed_memory
        keep_freed_memory()


def _methods(src: str, batch: int, threads: int, device: str, prior: str, config: dict | None, levels: int,
             wanted) -> tuple[dict, int, float]:
    """The model on ``batch`` real images and a callable per method in ``wanted``; returns (callables,
    n_features, seconds spent building the projections)."""
    import torch

    from fisher.priors import to_model_input
    from fisher.projection import ProjectionStack, SparseProjection
    from fisher.scores import fisher_scores, fisher_scores_reference, fisher_scores_vmap, n_features
    torch.set_num_threads(threads)
    _malloc()
    torch.manual_seed(0)
    images = _images(src, batch)
    model = _model(prior, images.shape[-1], levels, config).eval().to(device)
    x = to_model_input(images, device)
    n = n_features(model)
    setup = time.perf_counter()
    single = SparseProjection(n, 16384, None, seed=0) if {"scores+proj", "memory check"} & set(wanted) else None
    grid = ProjectionStack([SparseProjection(n, d, p, seed=0) for d in GRID_DIMS for p in GRID_DENSITIES]) \
        if "grid (12)" in wanted else None
    setup = time.perf_counter() - setup

    def train_step():
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x).sum()).backward()

    run = {"train step": train_step, "naive loop": lambda: fisher_scores_reference(model, x),
           "torch.func": lambda: torch.cat([fisher_scores_vmap(model, x[i:i + 32]) for i in range(0, len(x), 32)]),
           "scores": lambda: fisher_scores(model, x), "scores+proj": lambda: fisher_scores(model, x, single),
           "grid (12)": lambda: fisher_scores(model, x, grid), "memory check": lambda: fisher_scores(model, x, single)}
    return {m: run[m] for m in wanted}, n, setup


def _child(method: str, src: str, batch: int, threads: int, device: str, reps: int, q, prior: str = "pixelcnn",
           config: dict | None = None, levels: int = 2) -> None:
    import statistics

    import torch
    runs, n, setup = _methods(src, batch, threads, device, prior, config, levels, [method])
    run = runs[method]
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()                                           # cold run: peak memory, caches included
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_reset()
    out = run()
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    del out
    times = []                                       # warm runs: time (median)
    for _ in range(reps):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    q.put({"method": method, "batch": batch, "seconds": seconds, "peak_mb": peak / 2**20,
           "setup_seconds": setup, "n_features": n})


def _paired_child(methods: list[str], src: str, batch: int, threads: int, device: str, rounds: int, q,
                  prior: str, config: dict | None, levels: int) -> None:
    """``methods`` (the train step and one other) in one process, in turn, ``rounds`` times: each round's time
    over that round's train step, so that drift in a shared machine's speed (minutes long here) cancels out
    of the ratios. One method per process: run after the unprojected scores (148 MB of output per call) in
    the same process, the builtin CelebA Pyramid's scores + projection paired at 1.29x the step, against
    1.15-1.22x without them (2026-12-08), and a Fisher-score actor runs one method only."""
    import statistics

    import torch
    run, _, _ = _methods(src, batch, threads, device, prior, config, levels, methods)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for m in methods:                                # warm-up
        run[m]()
    ratios = {m: [] for m in methods}
    for _ in range(rounds):
        times = {}
        for m in methods:
            sync()
            t = time.perf_counter()
            run[m]()
            sync()
            times[m] = time.perf_counter() - t
        for m in methods:
            ratios[m].append(times[m] / times["train step"])
    q.put({m: {"median": statistics.median(r), "min": min(r), "max": max(r)} for m, r in ratios.items()})


def paired(methods, src, batch, threads, device, rounds, prior, config, levels) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_paired_child, args=(methods, src, batch, threads, device, rounds, q, prior, config,
                                                levels))
    p.start()
    return _result(p, q, "the paired timing")


def _result(p, q, what: str):
    """The child's result, or a dict {"failed": why} when it died first (out of memory: the kernel kills it
    with SIGKILL, and a bare ``q.get()`` would wait forever)."""
    import queue
    while True:
        try:
            res = q.get(timeout=2)
            p.join()
            return res
        except queue.Empty:
            if not p.is_alive():
                code = p.exitcode
                why = ("killed by SIGKILL, most likely out of memory" if code == -9 else
                       f"killed by signal {-code}" if code < 0 else f"exited with code {code}")
                print(f"{what}: its process {why}", file=sys.stderr, flush=True)
                return {"failed": why}


def measure(method: str, src: str, batch: int, threads: int, device: str, reps: int, prior: str = "pixelcnn",
            config: dict | None = None, levels: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(method, src, batch, threads, device, reps, q, prior, config, levels))
    p.start()
    res = _result(p, q, method)
    return {"method": method, "batch": batch, **res} if "failed" in res else res


def _embed_job(prior: str, data: str, out: str, dim: int, batch: int, threads: int) -> None:
    """What `fisher embed --splits test --dim DIM` does, in this process and without Ray."""
    import torch

    from fisher.data import decode_images
    from fisher.embedding import Embedder, EmbedSpec, embedding_table
    from fisher.io import atomic_write_table, manifest_hash, read_manifest, read_table
    from fisher.priors import load_prior
    torch.set_num_threads(threads)
    _malloc()
    manifest = read_manifest(data, "prepare")
    shape = manifest["image_shape"]
    emb = Embedder(load_prior(prior), "fisher", [EmbedSpec(dim, None)], shape)
    meta = {"kind": "fisher", "seed": 0, "prior": manifest_hash(read_manifest(prior)), "chunk_size": emb.chunk}
    for shard in (s for s in manifest["shards"] if s["split"] == "test"):
        table = read_table(f"{data}/{shard['file']}", ["id", "image"])
        images = decode_images(table, shape)
        parts = [emb(images[i:i + batch]) for i in range(0, len(images), batch)]
        ids = table["id"].to_numpy(zero_copy_only=False).astype(object)
        atomic_write_table(f"{out}/{shard['file']}", embedding_table(ids, {"z": np.concatenate([p["z"] for p in parts])},
                                                                     meta))


def _digests(folder: Path) -> dict:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def ray_throughput(src: str, n_images: int, dim: int, batch: int) -> dict:
    """`fisher embed` through Ray Data (1 actor) vs the same work in-process."""
    import ray
    import torch

    from fisher.data import MnistConfig, load_prepared, prepare_mnist
    from fisher.embedding import Embedder, EmbedSpec
    from fisher.io import write_manifest
    from fisher.priors import PixelCNN, save_prior
    from raycluster import cli
    from raycluster.runtime import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    prepare_mnist(MnistConfig(src=src, limit=n_images, shard_size=max(1, n_images // 4)), str(tmp / "data"))
    torch.manual_seed(0)
    save_prior(PixelCNN(), str(tmp / "prior"))
    write_manifest(str(tmp / "prior"), "train-prior", {"note": "untrained prior, for timing only"})
    test = load_prepared(str(tmp / "data"), "test")
    torch.set_num_threads(os.cpu_count())
    _malloc()
    emb = Embedder(PixelCNN().eval(), "fisher", [EmbedSpec(dim, None)], test["image"].shape[1:])
    emb(test["image"][:32])                           # warm-up, as the actor's first batch would be
    t = time.perf_counter()
    for i in range(0, len(test["image"]), batch):
        emb(test["image"][i:i + batch])
    in_process = time.perf_counter() - t
    (tmp / "job").mkdir()
    t = time.perf_counter()
    job = mp.get_context("spawn").Process(target=_embed_job, args=(str(tmp / "prior"), str(tmp / "data"),
                                                                   str(tmp / "job"), dim, batch, os.cpu_count()))
    job.start()
    job.join()
    job_seconds = time.perf_counter() - t
    assert job.exitcode == 0

    init_ray(argparse.Namespace(address=None, num_cpus=os.cpu_count()))      # the local Ray `fisher` starts
    t = time.perf_counter()
    rc = cli.main(["embed", "--prior", str(tmp / "prior"), "--data", str(tmp / "data"), "--out", str(tmp / "emb"),
                   "--splits", "test", "--dim", str(dim), "--actors", "1", "--batch-size", str(batch)])
    ray_seconds = time.perf_counter() - t
    ray.shutdown()
    assert rc == 0
    count = len(test["image"])
    timing = json.loads((tmp / "emb" / "manifest.json").read_text())["timing"]
    steady = timing["steady_images_per_second"]
    return {"images": count, "dim": dim, "in_process_img_s": count / in_process, "job_img_s": count / job_seconds,
            "ray_img_s": count / ray_seconds, "ray_steady_img_s": steady, "ratio": in_process / ray_seconds,
            "job_ratio": job_seconds / ray_seconds, "steady_ratio": steady * in_process / count,
            "ray_first_batch_seconds": timing["first_batch_seconds"],
            "identical_shards": _digests(tmp / "job") == _digests(tmp / "emb")}


def _ray_line(r: dict) -> str:
    return (f"\nRay Data embed, 1 actor, {r['images']} images, dim {r['dim']}:\n"
            f"  in-process, Embedder alone (images in memory, warm): {r['in_process_img_s']:.1f} img/s\n"
            f"  in-process, whole job in a fresh process:             {r['job_img_s']:.1f} img/s\n"
            f"  fisher embed on Ray Data, end to end:                 {r['ray_img_s']:.1f} img/s "
            f"(first batch after {r['ray_first_batch_seconds']:.1f} s); ratio {r['ratio']:.2f} to the Embedder alone, "
            f"{r['job_ratio']:.2f} to the whole job\n"
            f"  after the first batch: {r['ray_steady_img_s']:.1f} img/s, ratio {r['steady_ratio']:.2f} to the Embedder alone\n"
            f"  shards identical to the in-process job's: {'yes' if r['identical_shards'] else 'NO'}")


def method_table(args, prior: str, config: dict, src: str, levels: int, reps: int) -> list[dict]:
    """Every method for one prior, each in its own process; prints the table and returns its rows."""
    methods = ["train step", *SKIPPABLE]
    if args.skip_naive:
        methods.remove("naive loop")
    if args.skip_grid:
        methods.remove("grid (12)")
    methods = [m for m in methods if m not in args.skip]
    rows = [measure(m, src, args.batch, args.threads, args.device, reps, prior, config, levels) for m in methods]
    rows.append(measure("memory check", src, 4 * args.batch, args.threads, args.device, reps, prior, config, levels))
    if "failed" in rows[0]:
        raise SystemExit(f"{prior}: the training step itself failed ({rows[0]['failed']}); nothing to compare with")
    base, n = rows[0]["seconds"], rows[0]["n_features"]
    naive = next((r["seconds"] for r in rows if r["method"] == "naive loop" and "failed" not in r), None)
    ok = [m for m, r in zip(methods, rows) if "failed" not in r]       # a method that died alone dies paired too
    pairs = {}                                     # each method alternating with the step, in its own process
    for m in ok[1:] if args.rounds else []:
        pair = paired(["train step", m], src, args.batch, args.threads, args.device, args.rounds, prior, config,
                      levels)
        if "failed" not in pair:
            pairs.update(pair)
    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    print(f"\n{prior} {config or ''}, n_features={n}, batch {args.batch}, {where}, "
          f"median of {reps} warm run(s) per process; paired: median [min, max] over {args.rounds} rounds of each "
          f"method alternating with the train step in a process of their own, real {args.dataset}\n")
    print(f"{'method':<14}{'batch':>6}{'seconds':>10}{'x train step':>14}{'paired x step':>22}{'naive / this':>14}"
          f"{'peak MB':>10}")
    for r in rows:
        if "failed" in r:
            r["paired"] = None
            print(f"{r['method']:<14}{r['batch']:>6}  died: {r['failed']}")
            continue
        speed = f"{naive / r['seconds'] * r['batch'] / args.batch:>14.1f}" if naive else f"{'-':>14}"
        r["x_train_step"] = r["seconds"] / base * args.batch / r["batch"]
        pr = pairs.get(r["method"])
        r["paired"] = pr
        cell = f"{pr['median']:.2f} [{pr['min']:.2f}, {pr['max']:.2f}]" if pr else "-"
        print(f"{r['method']:<14}{r['batch']:>6}{r['seconds']:>10.4f}{r['x_train_step']:>14.2f}{cell:>22}{speed}"
              f"{r['peak_mb']:>10.0f}")
    proj = next((r for r in rows if r["method"] == "scores+proj" and "failed" not in r), None)
    if proj is not None:
        print(f"\nprojection setup (16384 x n, density 1/sqrt(n)): {proj['setup_seconds']:.2f} s, once per actor")
        print(f"peak memory, scores+proj: batch {args.batch}: {proj['peak_mb']:.0f} MB; "
              f"batch {4 * args.batch}: {_mb(rows[-1])}" + ("" if "failed" in rows[-1] else " MB"), flush=True)
    return rows


def _summary(tables: dict) -> None:
    print("\nsummary (x train step, paired medians where measured; peak MB):\n")
    print(f"{'prior':<28}{'features':>10}{'step s':>8}{'naive':>7}{'vmap':>7}{'scores':>8}{'+proj':>7}{'grid':>7}"
          f"{'MB +proj':>9}{'MB grid':>9}{'MB 4x':>8}")
    for prior, rows in tables.items():
        by = {r["method"]: r for r in rows}

        def x(m):
            if m not in by:
                return f"{'-':>7}"
            if "failed" in by[m]:
                return f"{'died':>7}"
            return f"{(by[m]['paired'] or {}).get('median', by[m]['x_train_step']):>7.2f}"
        print(f"{prior:<28}{rows[0]['n_features']:>10}{by['train step']['seconds']:>8.2f}{x('naive loop')}"
              f"{x('torch.func')}{x('scores'):>8}{x('scores+proj')}{x('grid (12)')}"
              f"{_mb(by.get('scores+proj')):>9}{_mb(by.get('grid (12)')):>9}{_mb(by['memory check']):>8}")


def _mb(row: dict | None) -> str:
    """A row's peak memory for the tables: MB, or why there is none."""
    return "-" if row is None else "died" if "failed" in row else f"{row['peak_mb']:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("mnist", "celeba"), default="mnist",
                    help="real test images: binarized MNIST (default) or CelebA as `fisher prepare` makes it")
    ap.add_argument("--mnist", default=str(SHARED), help="folder with the MNIST idx .gz files")
    ap.add_argument("--celeba", default=str(SHARED.parent / "celeba"), help="the CelebA folder (img_align_celeba/ "
                    "and the list files), or a folder with the images.npy an earlier run saved (--save-images)")
    ap.add_argument("--save-images", default=None, help="save the test images the tables would use (4x --batch of "
                    "them, as prepared) as DIR/images.npy and exit: to carry them to a GPU machine without the raw "
                    "data; pass DIR as --celeba (or --mnist) there")
    ap.add_argument("--size", type=int, default=32, help="CelebA side after the crop (default 32)")
    ap.add_argument("--bits", type=int, default=5, help="CelebA bits per sub-pixel (paper: 5)")
    ap.add_argument("--batch", type=int, default=128, help="batch size (paper: 128)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--device", default="cpu", help="torch device for the method table: cpu or cuda (the Ray "
                    "comparison always runs on the CPU)")
    ap.add_argument("--reps", type=int, default=None,
                    help="warm runs per method, median reported (default: 1 on cpu, 10 on cuda)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the paired timing (each method alternating "
                    "with the train step, the two in a process of their own; 0 skips it)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow per-image loop")
    ap.add_argument("--skip-ray", action="store_true", help="skip the Ray Data throughput comparison")
    ap.add_argument("--skip-grid", action="store_true", help="skip the 12-cell grid")
    ap.add_argument("--skip", default="", type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                    help="comma-separated methods to skip, by their names in the table (e.g. 'torch.func'); a "
                    "method whose process dies (out of memory) is reported as 'died' and left out of the pairing")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc as it is (by default every "
                    "method runs with fisher.malloc.keep_freed_memory, as `fisher embed`'s actors do)")
    ap.add_argument("--only-ray", action="store_true", help="only the Ray Data throughput comparison")
    ap.add_argument("--ray-images", type=int, default=2048, help="test images for the Ray comparison")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--prior", default="pixelcnn", help="comma-separated priors: registered families (built "
                    "untrained with --config) or trained priors (builtin:NAME, a directory); default pixelcnn, the "
                    "paper's MNIST prior")
    ap.add_argument("--config", default="{}", help="options as JSON: of the one family given, or {family: options}")
    args = ap.parse_args()
    if args.default_malloc:
        os.environ[DEFAULT_MALLOC] = "1"            # read by the method processes (spawned: they inherit it)
    priors = [p for p in args.prior.split(",") if p]
    for m in args.skip:
        if m not in SKIPPABLE:
            ap.error(f"--skip {m!r}: not a method that can be skipped; choose from {', '.join(SKIPPABLE)}")
    config = json.loads(args.config)

    if args.only_ray:
        r = ray_throughput(args.mnist, args.ray_images, 16384, args.batch)
        print(_ray_line(r))
        if args.json:
            Path(args.json).write_text(json.dumps({"ray": r}, indent=2))
        return
    src, levels = (args.mnist, 2) if args.dataset == "mnist" else _celeba_images(args.celeba, args.size, args.bits)
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        np.save(os.path.join(args.save_images, "images.npy"), _images(src, args.batch * 4))
        print(f"saved {args.batch * 4} test images to {args.save_images}/images.npy")
        return
    reps = args.reps or (1 if args.device == "cpu" else 10)
    tables = {}
    for prior in priors:
        own = config.get(prior, {}) if len(priors) > 1 or prior in config else config
        tables[prior] = method_table(args, prior, own, src, levels, reps)
    _summary(tables)
    result = {"tables": tables}
    if not args.skip_ray:
        r = ray_throughput(args.mnist, args.ray_images, 16384, args.batch)
        print(_ray_line(r))
        result["ray"] = r
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
