"""``fisher interpolate``, ``fisher edit``, ``fisher evaluate``: manipulations and their FID.

* ``interpolate`` (paper Figures 2 and 4): random test pairs, their decoded
  interpolations (1 - α) z₁ + α z₂ as one PNG, true images at both ends.
* ``edit`` (paper sec. 5.2, Figure 5): attribute directions
  δ = mean(z | attr) - mean(z | not attr) from the train split, applied as
  z ∓ scale·δ to test images (datasets with attributes: CelebA).
* ``evaluate`` (paper Algorithm 1, Figures 3b / 7): interpolation FID per α.
  N random pairs (the same for every α) are decoded and scored by the FID
  Inception on a Ray Data actor pool (``--actors``, ``--gpu`` or fractional
  ``--cpus-per-actor``): each actor loads the decoder, the embeddings and the
  Inception network once and maps batches of task ids to pool3 features.
  The real images' statistics are computed by a second pool (streaming the
  split's shards) and cached, keyed by the data, the split, the reference,
  the Inception weights and the image count; the cache also keeps up to
  10 000 real feature rows, against which each α's KID (Kernel Inception
  Distance: unbiased at any N, 100 subsets of min(1000, N) rows) is computed.
  ``--reference grey`` (the default where the data keeps MNIST's grey
  originals) compares with the grey images, ``--reference image`` with the
  binarized ones; the floor row uses the same reference.

The method is :mod:`fisher.evaluation`, the image layouts
:mod:`fisher.reports.layouts` and the FID table and plot
:mod:`fisher.reports.figure3b`; these stages read inputs, check that they
belong together, distribute the work and write the artifacts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from fisher.io import (
    MANIFEST,
    FisherError,
    atomic_write_bytes,
    claim_output,
    exists,
    is_dir,
    join,
    manifest_hash,
    read_bytes,
    read_json,
    read_manifest,
    read_table,
)
from raycluster import console
from raycluster.options import add_options, at_most, option, positive, ray_quantities, seeds
from raycluster.runtime import RayOptions, check_fits, init_ray, read_shards, worker_threads
from raycluster.runtime import device as runtime_device

FIG_ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5)        # Algorithm 1 / Figure 3b
STRIP_ALPHAS = tuple(i / 8 for i in range(9))        # 0, 0.125, ..., 1


def _alphas(value) -> list[float]:
    """``--alphas``: mixing coefficients in [0, 1], comma separated (or a list, in a preset)."""
    items = value if isinstance(value, (list, tuple)) else [t for t in str(value).split(",") if t.strip()]
    try:
        alphas = [float(t) for t in items]
    except (TypeError, ValueError):
        raise FisherError(f"--alphas {value!r}: expected numbers like 0,0.25,0.5") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise FisherError(f"--alphas {value!r}: mixing coefficients must lie in [0, 1]")
    if len(set(alphas)) != len(alphas):
        raise FisherError(f"--alphas {value!r}: repeated values")
    return alphas


def _count(value) -> int:
    """A count option: an integer >= 1."""
    try:
        v = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        v = None
    if v is None:
        raise FisherError(f"{value!r}: expected a positive integer")
    if v < 1:
        raise FisherError(f"{value}: must be >= 1")
    return v


@dataclass(kw_only=True)
class _DecodeOptions(RayOptions):
    """What interpolate, edit and evaluate read: a decoder and the embeddings and data it belongs to."""
    decoder: str = option(help="decoder checkpoint directory (from `fisher train-decoder`)")
    embeddings: str = option(help="embedding directory the decoder was trained on")
    data: str = option(help="prepared data directory the embeddings were made from")
    column: str = option("z", help="embedding column (default z)")
    out: str = option(help="output directory (local path or s3:// gs:// URI)")
    gpu: bool = option(False, help="decode on the GPU")

    def __post_init__(self):
        super().__post_init__()
        for name in ("pairs", "images", "real_limit", "batch_size", "actors"):
            if getattr(self, name, None) is not None:
                setattr(self, name, _count(getattr(self, name)))
        if hasattr(self, "alphas"):
            self.alphas = _alphas(self.alphas)
        seeds(self, "seed")
        at_most(self, self._most_pairs, "pairs", "images", why="one decoded row each" if self._most_pairs < 10**5
                else "the paper uses 50000")
        at_most(self, 1 << 16, "batch_size")
        at_most(self, 1024, "actors")

    _most_pairs = 1024          # interpolation strips and edit grids: one PNG row per pair or image


@dataclass(kw_only=True)
class InterpolateOptions(_DecodeOptions):
    split: str = option("test", help="split to draw pairs from (default test)")
    pairs: int = option(8, parse=_count, help="pairs, one row each (default 8)")
    alphas: list = option(default_factory=lambda: list(STRIP_ALPHAS), parse=_alphas,
                          help="mixing coefficients (default 9 evenly spaced from 0 to 1)")
    seed: int = option(0, help="seed of the pair draw")


@dataclass(kw_only=True)
class EditOptions(_DecodeOptions):
    attribute: str = option(help="attribute name(s) from the dataset (e.g. Smiling or Smiling,Eyeglasses)")
    scale: float = option(3.0, help="multiple of δ to add and remove (paper: 3)")
    images: int = option(8, parse=_count, help="test images to edit, one row each")
    split: str = option("test", help="split of the edited images (δ always comes from train)")
    seed: int = option(0, help="seed of the image choice")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.attribute, (list, tuple)):
            self.attribute = ",".join(self.attribute)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise FisherError(f"--scale {self.scale}: must be a finite number (paper: 3)")


@dataclass(kw_only=True)
class EvaluateOptions(_DecodeOptions):
    split: str = option("test", help="split for pairs and real images (default test)")
    pairs: int = option(50000, parse=_count, help="pairs N per α (paper: 50 000)")
    alphas: list = option(default_factory=lambda: list(FIG_ALPHAS), parse=_alphas,
                          help="mixing coefficients (default 0,0.125,0.25,0.375,0.5)")
    real_limit: int | None = option(None, parse=_count,
                                    help="real statistics from the first N images of the split only (default: all)")
    fid_weights: str | None = option(None, help="FID Inception weights (pytorch-fid's pt_inception-2015-12-05 "
                                                ".pth); default $FISHER_FID_WEIGHTS, else pytorch-fid downloads them")
    cache: str | None = option(None, help="real-statistics cache directory (default DATA/fid-cache)")
    floor: bool = option(True, help="also score N real images of --floor-split against the same statistics: the "
                                    "lowest FID this N can show (default on)")
    floor_split: str = option("train", help="split of the floor's real images (default train)")
    reference: str | None = option(None, choices=("image", "grey"),
                                   help="real images FID/KID compare with: grey (MNIST's grey originals, the default "
                                        "where the data keeps them: a decoder's mean estimates the grey image) or "
                                        "image (the binarized / bit-reduced images; the only choice for CelebA)")
    label: str | None = option(None, help="row label in the table (default <embedding kind>/<decoder>)")
    seed: int = option(0, help="seed of the pair draw")
    batch_size: int = option(100, parse=_count, help="images per actor batch, at most (smaller for small "
                                                                  "steps, so that progress shows)")
    actors: int = option(1, parse=_count, help="actors in the pool")
    gpu: bool = option(False, help="one GPU per actor")
    cpus_per_actor: float = option(0.5, help="CPUs reserved per actor (fractional allowed)")

    _most_pairs = 1_000_000     # FID: pairs x alphas decoded images

    def __post_init__(self):
        super().__post_init__()
        positive(self, "cpus_per_actor")
        ray_quantities(self, "cpus_per_actor")


def register(sub) -> None:
    for name, options, func, help in (
            ("interpolate", InterpolateOptions, run_interpolate, "decoded interpolations between random image pairs (PNG)"),
            ("edit", EditOptions, run_edit, "attribute edits z ∓ scale·δ (CelebA attributes, paper Figure 5)"),
            ("evaluate", EvaluateOptions, run_evaluate, "interpolation FID per α (paper Algorithm 1) on a Ray actor pool")):
        p = sub.add_parser(name, help=help, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p, options)
        p.set_defaults(func=func, options=options)


# ---------------------------------------------------------------- inputs

def _inputs(args) -> dict:
    """Read the data, embedding and decoder artifacts and check that they belong together."""
    from fisher.checkpoints import WEIGHTS, read_files, read_spec, spec_file
    from fisher.data import data_levels, reference_column
    data = read_manifest(args.data, "prepare")
    reference = reference_column(data, args.reference, args.data) if hasattr(args, "reference") else None
    emb = read_manifest(args.embeddings, "embed")
    if emb.get("inputs", {}).get("data") != manifest_hash(data):
        raise FisherError(f"{args.embeddings}: embeddings were made from other data "
                          f"({emb.get('inputs', {}).get('data')}) than {args.data} ({manifest_hash(data)}); "
                          "pass the --data used by `fisher embed`")
    if args.column not in emb["columns"]:
        raise FisherError(f"{args.embeddings}: no column '{args.column}' (has {', '.join(emb['columns'])}); "
                          "pass --column")
    name = spec_file(args.decoder, "decoder")
    if name is None:
        raise FisherError(f"{args.decoder}: no module.json; pass a decoder checkpoint directory "
                          "(from `fisher train-decoder`)")
    spec_bytes = read_bytes(join(args.decoder, name))
    spec = read_spec(read_files(args.decoder, (name,)), "decoder", args.decoder)
    try:
        arch, z_dim = spec["arch"], int(spec["args"]["z_dim"])
        shape, levels = list(spec["args"]["image_shape"]), int(spec["args"]["levels"])
    except (KeyError, TypeError, ValueError) as e:
        raise FisherError(f"{args.decoder}/{name}: not a decoder description ({e}); retrain the decoder") from e
    dim = emb["columns"][args.column].get("dim")
    if dim is not None and int(dim) != z_dim:
        raise FisherError(f"{args.decoder}: decodes {z_dim}-dim embeddings, but column '{args.column}' of "
                          f"{args.embeddings} has dim {dim}; pass the decoder trained on these embeddings")
    if shape != list(data["image_shape"]) or levels != data_levels(data):
        raise FisherError(f"{args.decoder}: makes {shape} images with {levels} levels, but {args.data} holds "
                          f"{data['image_shape']} with {data_levels(data)}; pass matching data")
    decoder_manifest = None
    if exists(join(args.decoder, MANIFEST)):
        decoder_manifest = read_manifest(args.decoder)
        if decoder_manifest.get("stage") == "train-decoder":
            trained_on = decoder_manifest.get("inputs", {}).get("embeddings")
            if trained_on not in (None, manifest_hash(emb)):
                raise FisherError(f"{args.decoder}: trained on embeddings {trained_on} "
                                  f"({decoder_manifest.get('embeddings')}), not on {args.embeddings} "
                                  f"({manifest_hash(emb)}); pass matching --embeddings")
            col = decoder_manifest.get("config", {}).get("column")
            if col not in (None, args.column):
                raise FisherError(f"{args.decoder}: trained on column '{col}', not '{args.column}'; "
                                  f"pass --column {col}")
    weights = read_bytes(join(args.decoder, WEIGHTS)) if exists(join(args.decoder, WEIGHTS)) else b""
    decoder_id = hashlib.sha256(weights + spec_bytes).hexdigest()[:16]
    kind = emb.get("config", {}).get("kind", "embedding")
    return {"data": data, "emb": emb, "arch": arch, "levels": levels, "shape": shape, "kind": kind,
            "decoder_id": decoder_id, "reference": reference,
            "inputs": {"data": manifest_hash(data), "embeddings": manifest_hash(emb), "decoder": decoder_id}}


def _device(args) -> str:
    if getattr(args, "gpu", False):
        import torch
        if not torch.cuda.is_available():
            raise FisherError("--gpu: no CUDA device is visible here; leave out --gpu")
        return "cuda"
    return "cpu"


def _write_manifest(out: str, stage: str, config: dict, info: dict, **extra) -> None:
    from fisher.io import write_manifest
    write_manifest(out, stage, config, inputs=info["inputs"], **extra)


# ---------------------------------------------------------------- interpolate

def run_interpolate(args) -> None:
    from fisher.decoders import load_decoder
    from fisher.embedding import read_embeddings
    from fisher.evaluation import decode_interpolations, load_rows
    from fisher.images import save_png
    from fisher.manipulation import random_pairs
    from fisher.reports.layouts import interpolation_image

    info = _inputs(args)
    claim_output(args.out, "interpolate")
    device = _device(args)
    ids, z = read_embeddings(args.embeddings, args.split, args.column)
    pairs = random_pairs(len(ids), args.pairs, args.seed)
    decoder = load_decoder(args.decoder, map_location=device)
    decoded = decode_interpolations(decoder, z, pairs, args.alphas, info["levels"], device=device)   # (P, A, C, H, W)
    true = load_rows(args.data, args.split, ids[pairs.ravel()], columns=("image",))["image"]
    strip = interpolation_image(decoded, true.reshape(len(pairs), 2, *true.shape[1:]), info["levels"])
    save_png(join(args.out, "interpolations.png"), strip)
    config = {"split": args.split, "pairs": args.pairs, "alphas": args.alphas, "seed": args.seed,
              "column": args.column}
    _write_manifest(args.out, "interpolate", config, info, embeddings=args.embeddings, data=args.data,
                    decoder_dir=args.decoder, files={"interpolations.png": "rows = pairs; columns = x1, "
                                                     "E[Dec((1-α) z1 + α z2)] for each α, x2"},
                    pair_ids=[[str(a), str(b)] for a, b in ids[pairs]], image_size=list(strip.shape))
    console.say(f"interpolations of {len(pairs)} {args.split} pairs at α = {', '.join(f'{a:g}' for a in args.alphas)} "
          f"written to {join(args.out, 'interpolations.png')}")


# ---------------------------------------------------------------- edit

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_edit(args) -> None:
    from fisher.decoders import load_decoder
    from fisher.embedding import read_embeddings
    from fisher.evaluation import edit_grid_images, load_rows
    from fisher.images import save_png
    from fisher.manipulation import attribute_direction
    from fisher.reports.layouts import edit_image

    names = [a.strip() for a in args.attribute.split(",") if a.strip()]
    data = read_manifest(args.data, "prepare")
    attr_names = data.get("attr_names")
    if not attr_names:
        raise FisherError(f"{args.data}: a {data.get('config', {}).get('dataset', 'dataset')} dataset without "
                          "attributes; edits need a dataset with attributes (prepare CelebA)")
    unknown = [n for n in names if n not in attr_names]
    if unknown or not names:
        raise FisherError(f"--attribute {args.attribute!r}: unknown {', '.join(unknown) or 'attribute'}; "
                          f"valid names include {', '.join(attr_names[:8])}, … ({len(attr_names)} in all)")
    info = _inputs(args)
    claim_output(args.out, "edit")
    device = _device(args)

    train_ids, z_train = read_embeddings(args.embeddings, "train", args.column)
    attrs = load_rows(args.data, "train", train_ids, columns=("attrs",))["attrs"]
    ids, z = read_embeddings(args.embeddings, args.split, args.column)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(ids), size=min(args.images, len(ids)), replace=False))
    true = load_rows(args.data, args.split, ids[chosen], columns=("image",))["image"]
    decoder = load_decoder(args.decoder, map_location=device)

    files, directions = {}, {}
    for name in names:
        k = attr_names.index(name)
        has = attrs[:, k] == 1
        delta = attribute_direction(z_train, has, name)
        images = edit_grid_images(decoder, z[chosen], delta, args.scale, info["levels"], device=device)
        fname = f"edit-{_slug(name)}.png"
        save_png(join(args.out, fname), edit_image(true, images, info["levels"]))
        files[fname] = f"rows = images; columns = true, z - {args.scale:g}·δ, reconstruction, z + {args.scale:g}·δ"
        directions[name] = {"with": int(has.sum()), "without": int((~has).sum()),
                            "delta_norm": float(np.linalg.norm(delta.double().numpy()))}
    config = {"attributes": names, "scale": args.scale, "images": args.images, "split": args.split,
              "seed": args.seed, "column": args.column, "directions_from": "train"}
    _write_manifest(args.out, "edit", config, info, embeddings=args.embeddings, data=args.data,
                    decoder_dir=args.decoder, files=files, directions=directions,
                    image_ids=[str(i) for i in ids[chosen]])
    console.say(f"edits of {len(chosen)} {args.split} images ({', '.join(names)}; scale {args.scale:g}) written to "
          f"{args.out}")


# ---------------------------------------------------------------- evaluate (Algorithm 1)

class _InterpActor:
    """Ray Data actor: decoder, embeddings and Inception loaded once; task ids → pool3 features."""

    def __init__(self, decoder: str, embeddings: str, split: str, column: str, pairs, alphas, levels: int,
                 weights: str | None, weights_id: str, threads: int, gpu: bool):
        import torch

        from fisher.decoders import load_decoder
        from fisher.embedding import read_embeddings
        from fisher.evaluation import InterpolationFeatures
        torch.set_num_threads(threads)
        device = runtime_device(gpu)
        inception = _inception(weights, weights_id, device)
        _, z = read_embeddings(embeddings, split, column)
        self.scorer = InterpolationFeatures(load_decoder(decoder, map_location=device), inception, z, pairs,
                                            alphas, levels, device)

    def __call__(self, batch: dict) -> dict:
        return {"task": batch["id"], "features": self.scorer(batch["id"])}


class _RealActor:
    """Ray Data actor: Inception loaded once; image shards (their ``column``: image or grey, with ``levels``)
    → pool3 features (rows outside ``keep`` dropped)."""

    def __init__(self, shape, levels: int, keep, weights: str | None, weights_id: str, threads: int, gpu: bool,
                 column: str = "image"):
        import torch
        torch.set_num_threads(threads)
        self.device = runtime_device(gpu)
        self.shape, self.levels, self.column = shape, levels, column
        self.keep = None if keep is None else set(keep)
        self.model = _inception(weights, weights_id, self.device)

    def __call__(self, batch) -> dict:
        from fisher.data import decode_images
        from fisher.evaluation import real_features
        ids = np.asarray(batch["id"].to_pylist(), dtype=object)
        images = decode_images(batch, self.shape, self.column)
        if self.keep is not None:
            sel = np.array([i in self.keep for i in ids], dtype=bool)
            ids, images = ids[sel], images[sel]
        feats = real_features(self.model, images, self.levels, device=self.device) if len(ids) else \
            np.zeros((0, 2048), np.float32)
        return {"id": ids, "features": feats}


def _inception(weights: str | None, weights_id: str, device: str):
    from fisher.fid import load_inception
    model = load_inception(weights, device)
    if model.weights_id != weights_id:
        raise FisherError(f"Inception weights on this worker ({model.weights_id}) differ from the driver's "
                          f"({weights_id}); give every node the same --fid-weights file")
    return model


def _real_ids(args, data: dict, limit: int | None, split: str) -> tuple[list[str], list[str] | None]:
    """Shard files of ``split`` to read, and the ids to keep (None = all rows of those shards)."""
    shards = [s for s in data["shards"] if s["split"] == split]
    if not shards:
        raise FisherError(f"{args.data}: no '{split}' split (has {sorted(data.get('counts', {}))})")
    if limit is None:
        return [join(args.data, s["file"]) for s in shards], None
    files, keep = [], []
    for s in shards:
        ids = read_table(join(args.data, s["file"]), ["id"])["id"].to_pylist()
        files.append(join(args.data, s["file"]))
        keep += ids[:limit - len(keep)]
        if len(keep) >= limit:
            break
    return files, keep


def _progress_batch(total: int, batch_size: int) -> int:
    """Actor batch size: ``--batch-size``, smaller where the step would otherwise arrive in a few large
    pieces (at least 20, so that its progress bar moves with the work; 150 images in batches of 100 would
    show 0 % until the end)."""
    return max(1, min(batch_size, math.ceil(total / 20)))


def _pool(args, resources: dict):
    """(torch threads per actor, map_batches options of the actor pool)."""
    from ray.data import ActorPoolStrategy
    threads = 1 if args.gpu else max(1, worker_threads(resources, args.actors))
    return threads, dict(compute=ActorPoolStrategy(size=args.actors), num_gpus=1 if args.gpu else 0,
                         num_cpus=args.cpus_per_actor)


def _real_features(args, info: dict, split: str, count: int, limit: int | None, weights: str | None,
                   weights_id: str, resources: dict, desc: str) -> np.ndarray:
    """Inception features [count, D] float64 of the first ``limit`` (all: None) images of ``split``, in id order,
    computed on an actor pool from the ``--reference`` column (image or grey)."""
    data = info["data"]
    column, levels = info["reference"]
    files, keep = _real_ids(args, data, limit, split)
    threads, pool = _pool(args, resources)
    ds = read_shards(files, ["id", column]).map_batches(
        _RealActor, batch_size=_progress_batch(count, args.batch_size), batch_format="pyarrow",
        fn_constructor_kwargs=dict(shape=data["image_shape"], levels=levels, keep=keep, weights=weights,
                                   weights_id=weights_id, threads=threads, gpu=args.gpu, column=column), **pool)
    ids, feats = [], []
    bar = console.progress(count, desc)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(np.asarray(batch["id"], dtype=str))
        feats.append(np.asarray(batch["features"], dtype=np.float32).reshape(len(batch["id"]), -1))
        bar.update(len(batch["id"]))
    bar.close()
    ids, feats = np.concatenate(ids), np.concatenate(feats)
    if len(ids) != count:
        raise FisherError(f"{args.data}: got features of {len(ids)} '{split}' images, expected {count}; rerun")
    return feats[np.argsort(ids, kind="stable")].astype(np.float64)     # order-independent result


def _real_floor(args, info: dict, real, real_key: str, weights: str | None, weights_id: str,
                resources_fn) -> dict:
    """FID and KID of ``--pairs`` real images of ``--floor-split`` (the same ``--reference`` column) against the
    real statistics and their kept feature rows: with N samples even real images score above 0 in FID
    (small-sample bias), so this is the floor an N-pair FID is read against. Cached beside the real
    statistics (``real_key`` holds the reference); a cached floor without KID is recomputed."""
    from fisher.evaluation import frechet, kid_of
    total = int(info["data"]["counts"].get(args.floor_split, 0))
    count = min(args.pairs, total)
    if count < 2:
        raise FisherError(f"{args.data}: split '{args.floor_split}' has {total} images; the FID floor needs at "
                          "least 2 (pass --floor-split or --no-floor)")
    uri = join(args.cache or join(args.data, "fid-cache"), f"fid-floor-{real_key}-{args.floor_split}-{count}.json")
    if exists(uri):
        cached = read_json(uri, "cached FID floor", "delete it and rerun")
        if "kid" in cached:
            return cached
    feats = _real_features(args, info, args.floor_split, count, count, weights, weights_id, resources_fn(),
                           f"floor ({args.floor_split} images)")
    value, regularized = frechet(feats, real)
    floor = {"split": args.floor_split, "count": count, "reference": info["reference"][0], "fid": value,
             "regularized": regularized, "kid": kid_of(feats, real.features)}
    atomic_write_bytes(uri, json.dumps(floor).encode())
    return floor


def _real_stats(args, info: dict, weights: str | None, weights_id: str, resources_fn):
    """Real-image statistics of the split's ``--reference`` column, with up to ``REAL_FEATURES_KEPT`` feature
    rows for KID, from the cache or computed on an actor pool (and cached)."""
    from fisher.fid import REAL_FEATURES_KEPT, cache_status, cached_real_stats
    data = info["data"]
    reference = info["reference"][0]
    total = int(data["counts"].get(args.split, 0))
    count = min(args.real_limit, total) if args.real_limit else total
    if count < 2:
        raise FisherError(f"{args.data}: split '{args.split}' has {total} images; FID needs at least 2 real images")
    cache = args.cache or join(args.data, "fid-cache")
    key = f"{manifest_hash(data)}-{args.split}-{reference}-{weights_id}-{count}"
    uri = join(cache, f"fid-stats-{key}.npz")
    status = cache_status(uri, REAL_FEATURES_KEPT)
    if status == "usable":
        console.say(f"evaluate: real statistics reused from {uri}")
    else:
        console.say(f"evaluate: computing real statistics of {count} {args.split} images ({reference} reference; cached as "
              f"{uri}" + (", replacing a cache without the real features KID needs" if status == "no-features" else "")
              + ")")

    def compute() -> np.ndarray:
        return _real_features(args, info, args.split, count, args.real_limit, weights, weights_id,
                              resources_fn(), "real images")

    stats = cached_real_stats(cache, key, compute, keep_features=REAL_FEATURES_KEPT)
    return stats, {"split": args.split, "count": count, "reference": reference, "features_kept": len(stats.features),
                   "cache": uri, "key": key}


def _kid_text(k: dict) -> str:
    return f"KID {k['mean'] * 1e3:.3f} ± {k['stderr'] * 1e3:.3f} ×10⁻³"


def run_evaluate(args) -> None:
    import ray.data

    from fisher.embedding import read_embeddings
    from fisher.evaluation import FIDAccumulator
    from fisher.reports.figure3b import fid_markdown, fid_plot
    from fisher.fid import WEIGHTS_ENV, load_inception
    from fisher.manipulation import random_pairs

    info = _inputs(args)
    counts = info["data"]["counts"]
    for flag, split, wanted in (("--split", args.split, True), ("--floor-split", args.floor_split, args.floor)):
        if wanted and counts.get(split, 0) < 2:     # refused here, not after the real statistics' Ray work
            raise FisherError(f"{flag} {split}: {args.data} has {counts.get(split, 0)} images in it (splits: "
                              f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); FID needs at least 2: "
                              f"pass another {flag}" + (" or --no-floor" if flag == "--floor-split" else ""))
    cache = args.cache or join(args.data, "fid-cache")
    if exists(cache) and not is_dir(cache):     # refused now, not when the first statistics are written
        raise FisherError(f"--cache {cache}: exists and is not a directory; pass a directory for the real-image "
                          "statistics (default DATA/fid-cache)")
    claim_output(args.out, "evaluate")
    weights = args.fid_weights or os.environ.get(WEIGHTS_ENV) or None
    weights_id = load_inception(weights).weights_id        # fails fast (and offline) with what to pass
    label = args.label or f"{info['kind']}/{info['arch']}"
    ids, _ = read_embeddings(args.embeddings, args.split, args.column)
    pairs = random_pairs(len(ids), args.pairs, args.seed)
    reference = info["reference"][0]
    config = {"split": args.split, "pairs": args.pairs, "alphas": args.alphas, "seed": args.seed,
              "column": args.column, "real_limit": args.real_limit, "weights_id": weights_id, "label": label,
              "floor": args.floor_split if args.floor else None, "reference": reference}
    if exists(join(args.out, "fid.json")) and exists(join(args.out, MANIFEST)):
        old = read_manifest(args.out, "evaluate")
        if old.get("config") == config and old.get("inputs") == info["inputs"]:
            console.say(f"{args.out}: already evaluated with this config; nothing to do")
            return

    resources: dict = {}

    def ray_resources() -> dict:
        if not resources:
            resources.update(init_ray(args))
            check_fits(args, {"CPU": args.cpus_per_actor, "GPU": int(args.gpu)},
                       {"CPU": f"--cpus-per-actor {args.cpus_per_actor:g}", "GPU": "--gpu"})
        return resources

    started = time.time()
    real, real_info = _real_stats(args, info, weights, weights_id, ray_resources)
    floor = _real_floor(args, info, real, real_info["key"], weights, weights_id, ray_resources) if args.floor \
        else None
    if floor:
        console.say(f"evaluate: floor: {floor['count']} real {floor['split']} images score FID {floor['fid']:.3f}, "
              f"{_kid_text(floor['kid'])}")
    t_real = time.time() - started

    total = args.pairs * len(args.alphas)
    threads, pool = _pool(args, ray_resources())
    batch = _progress_batch(total, args.batch_size)
    blocks = max(1, min(math.ceil(total / batch), 200))
    ds = ray.data.range(total, override_num_blocks=blocks).map_batches(
        _InterpActor, batch_size=batch, batch_format="numpy",
        fn_constructor_kwargs=dict(decoder=args.decoder, embeddings=args.embeddings, split=args.split,
                                   column=args.column, pairs=pairs, alphas=args.alphas, levels=info["levels"],
                                   weights=weights, weights_id=weights_id, threads=threads, gpu=args.gpu),
        **pool)
    acc = FIDAccumulator(args.pairs, args.alphas, real)      # KID against real.features, the rows the cache kept
    bar = console.progress(total, "interpolations")
    t0, t_fid = time.time(), 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        feats = np.asarray(batch["features"], dtype=np.float32).reshape(len(batch["task"]), -1)
        t1 = time.time()
        for alpha in acc.add(batch["task"], feats):
            console.log(f"evaluate: α = {alpha:g}: FID {acc.fid[alpha]:.3f}, {_kid_text(acc.kid[alpha])}")
        t_fid += time.time() - t1
        bar.update(len(batch["task"]))
    bar.close()
    fids, kids = acc.result(), acc.kid_result()
    t_gen = time.time() - t0 - t_fid

    result = {"label": label, "fid": {f"{a:g}": v for a, v in fids.items()},
              "kid": {f"{a:g}": v for a, v in kids.items()}, "reference": reference, "alphas": args.alphas,
              "pairs": args.pairs, "weights_id": weights_id, "real": real_info, "seed": args.seed,
              "split": args.split, "decoder": args.decoder, "embeddings": args.embeddings, "column": args.column,
              "regularized_alphas": acc.regularized, "real_floor": floor,
              "timing": {"real_seconds": round(t_real, 3), "generated_seconds": round(t_gen, 3),
                         "generated_images_per_second": round(total / t_gen, 3) if t_gen > 0 else None,
                         "frechet_seconds": round(acc.seconds["frechet"], 3),
                         "kid_seconds": round(acc.seconds["kid"], 3)}}
    atomic_write_bytes(join(args.out, "fid.png"), fid_plot([result], title=f"Interpolation FID, {label}"))
    atomic_write_bytes(join(args.out, "fid.md"), fid_markdown(result).encode())
    _write_manifest(args.out, "evaluate", config, info, embeddings=args.embeddings, data=args.data,
                    decoder_dir=args.decoder, fid=result["fid"], kid=result["kid"], reference=reference,
                    real=real_info, timing=result["timing"],
                    files=["fid.json", "fid.md", "fid.png"])
    atomic_write_bytes(join(args.out, "fid.json"), json.dumps(result, indent=2).encode())
    floor_text = f"; real-image floor {floor['fid']:.2f}" if floor else ""
    console.say(f"evaluate: {label}: " + ", ".join(f"α = {a:g} FID {fids[a]:.2f} ({_kid_text(kids[a])})" for a in fids)
                + f" on {args.pairs} pairs{floor_text}; written to {join(args.out, 'fid.json')} (tables: fid.md)")
