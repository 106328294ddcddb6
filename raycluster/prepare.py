"""``fisher prepare``: raw MNIST idx files or a CelebA folder → Parquet shards + manifest.

The method lives in :mod:`fisher.data`; this module parses options, downloads
MNIST when no ``--src`` is given, and decodes CelebA JPEGs in a process pool.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields


from fisher import data
from fisher.io import FisherError, claim_output, join
from raycluster import console
from raycluster.options import add_options, at_least, at_most, option, seeds

_MNIST = {f.name: f.default for f in fields(data.MnistConfig)}
_CELEBA = {f.name: f.default for f in fields(data.CelebaConfig)}
_OUTPUT_OPTIONS = {"mnist": ("seed", "shard_size", "limit"),          # options that go into each config
                   "celeba": ("size", "bits", "skip_bad", "shard_size", "limit")}


@dataclass(kw_only=True)
class PrepareOptions:
    """Options of ``fisher prepare``; the dataset's own defaults are :class:`fisher.data.MnistConfig` and
    :class:`fisher.data.CelebaConfig` (an option the dataset does not use is refused)."""
    dataset: str = option(positional=True, choices=("mnist", "celeba"), help="which dataset to prepare")
    src: str | None = option(None, metavar="DIR",
                             help="input folder: for mnist the four idx .gz files (default: download them into "
                                  "OUT/raw); for celeba (required) the folder with img_align_celeba/, "
                                  "list_attr_celeba.txt and list_eval_partition.txt")
    out: str = option(metavar="DIR", help="output directory (local path, s3:// or gs:// URI)")
    seed: int | None = option(None, help=f"mnist: Bernoulli binarization seed (default {_MNIST['seed']})")
    shard_size: int | None = option(None, metavar="ROWS", help=f"rows per Parquet shard (default {_MNIST['shard_size']})")
    size: int | None = option(None, help=f"celeba: output side in pixels after the 128x128 crop "
                                         f"(default {_CELEBA['size']}; 64 or 32 for small runs)")
    bits: int | None = option(None, help=f"celeba: bits kept per sub-pixel (default {_CELEBA['bits']})")
    skip_bad: bool = option(False, help="celeba: skip unreadable or wrongly sized images (counted in the manifest) "
                                        "instead of failing")
    workers: int | None = option(os.cpu_count(), help=f"celeba: JPEG decoding processes (default: the CPU count, "
                                                      f"here {os.cpu_count()})")
    limit: int | None = option(None, metavar="N", help="only the first N images of each split (small runs)")

    def __post_init__(self):
        if self.dataset not in ("mnist", "celeba"):
            raise FisherError(f"dataset {self.dataset!r}: expected mnist or celeba")
        seeds(self, "seed")
        at_least(self, 1, "shard_size", "limit", "workers", "size", "bits")
        at_most(self, 1 << 20, "shard_size")
        at_most(self, 1024, "workers")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="turn raw MNIST or CelebA into Parquet shards",
        description="Binarize MNIST (paper sec. 5.1) or crop/resize/bit-reduce CelebA (sec. 5.2) into "
                    "{split}-NNNNN.parquet shards plus manifest.json. Rerunning with the same options is a no-op; "
                    "rerunning an interrupted run keeps its finished shards and writes the rest.")
    add_options(p, PrepareOptions)
    p.set_defaults(func=run, options=PrepareOptions)


def run(args: PrepareOptions) -> dict:
    options = _options(args)
    manifest, reused = _run_mnist(args, options) if args.dataset == "mnist" else _run_celeba(args, options)
    counts = ", ".join(f"{split} {manifest['counts'][split]}" for split in data.SPLIT_CODES
                       if split in manifest["counts"])
    if reused:
        console.say(f"{args.out}: already prepared with the same config ({counts}); nothing to do")
        if args.dataset == "mnist" and "grey" not in data.data_references(manifest):
            console.say(f"note: {args.out} was prepared before MNIST kept its grey originals: `fisher evaluate` can only "
                  "compare with the binarized images (--reference image); prepare into a new --out to keep them")
    else:
        skipped = manifest["skipped"]["count"]
        console.say(f"{args.out}: prepared {args.dataset} ({counts}; image shape {manifest['image_shape']}, "
              f"{len(manifest['shards'])} shards" + (f", {skipped} bad images skipped" if skipped else "") + ")")
    return manifest


def _options(args) -> dict:
    """The config options given on the command line; refuses those the dataset does not use."""
    given = {name: value for name in {n for names in _OUTPUT_OPTIONS.values() for n in names}
             if (value := getattr(args, name)) is not None and value is not False}   # keeps 0: --limit 0 is checked
    unused = sorted(f"--{name.replace('_', '-')}" for name in given if name not in _OUTPUT_OPTIONS[args.dataset])
    if unused:
        raise FisherError(f"{', '.join(unused)}: not used for {args.dataset}; "
                          "MNIST takes --seed, CelebA takes --size, --bits and --skip-bad")
    return given


def _run_mnist(args, options: dict) -> tuple[dict, bool]:
    src = args.src or join(args.out, "raw")
    cfg = data.MnistConfig(src=src, **options)
    if args.src is None:
        claim_output(args.out, "prepare")          # OUT/raw is this stage's own
        console.say(f"MNIST idx files: {src} (downloading any that are missing)")
        data.mnist_download(src)
    return data.prepare_mnist(cfg, args.out, log=console.say)


def _run_celeba(args, options: dict) -> tuple[dict, bool]:
    if args.src is None:
        raise FisherError("--src: required for celeba; pass the folder holding img_align_celeba/, "
                          "list_attr_celeba.txt and list_eval_partition.txt")
    if args.workers is None or args.workers < 1:
        raise FisherError(f"--workers {args.workers}: must be >= 1")
    cfg = data.CelebaConfig(src=args.src, **options)
    with _progress_pool(args.workers) as mapper:
        return data.prepare_celeba(cfg, args.out, mapper=mapper, log=console.say)


@contextmanager
def _progress_pool(workers: int):
    """A ``mapper(fn, chunks)`` running chunks in ``workers`` processes, with a tqdm bar over images."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None

    def mapper(fn, chunks):
        results = pool.map(fn, chunks) if pool else map(fn, chunks)
        with console.progress(sum(map(len, chunks)), "decoding JPEGs") as bar:
            for chunk, result in zip(chunks, results):
                bar.update(len(chunk))
                yield result

    try:
        yield mapper
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
