"""``fisher embed``: Fisher-score (or activation) embeddings with Ray Data.

Shards stream to a pool of actors (``ActorPoolStrategy``; one GPU each when
``--gpu``, fractional CPUs otherwise). Every actor loads the prior and builds
the seeded projections once (:class:`fisher.embedding.Embedder`), so all
actors on all machines apply the same matrices. Rows are collected per input
shard and written as one Parquet shard with the same name (``id`` plus one
float32 column per projection, sorted by id), atomically, as soon as the shard
is complete. Existing output shards are skipped, so rerunning an interrupted
command finishes only what is missing and gives the same bytes.

All (dim, density) pairs requested (``--dim 64,256 --density 0.01,auto``
gives their product) come from one gradient pass. Optional standardization
and PCA are fitted on the train split afterwards and stored as
``transform.npz``; they add a ``<column>_t`` column to every shard.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time
import traceback
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fisher.data import check_shards
from fisher.embedding import column_array, embedding_table, vector_column
from fisher.footprint import scores_bytes
from fisher.projection import MIN_DENSITY, estimated_bytes
from fisher.scores import default_chunk
from fisher.io import (
    FisherError,
    atomic_write_bytes,
    atomic_write_table,
    claim_output,
    exists,
    join,
    manifest_hash,
    parquet_metadata,
    read_manifest,
    read_table,
    resolve,
    write_manifest,
)
from raycluster import console
from raycluster.options import add_options, at_least, at_most, option, positive, ray_quantities, seeds
from raycluster.runtime import (RayOptions, check_fits, check_memory, init_ray, lost_to_the_cluster, read_shards,
                                worker_threads)
from raycluster.runtime import device as runtime_device

_NODE = "_node"         # per-row Ray node id from the actors; not written to the shards


def _dims(value) -> list[int]:
    """``--dim``: '16384' or '64,256,1024' (or an int / a list, in a preset)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        dims = [int(t) for t in items if not isinstance(t, (bool, float))]
    except ValueError:
        raise FisherError(f"--dim {value!r}: expected integers like 16384 or 64,256,1024") from None
    if len(dims) != len(items) or not dims:
        raise FisherError(f"--dim {value!r}: expected integers like 16384 or 64,256,1024")
    if any(d < 1 for d in dims):
        raise FisherError(f"--dim {value!r}: dimensions must be >= 1")
    return dims


def _densities(value) -> list[float | None]:
    """``--density``: numbers in (0, 1] or 'auto' (= 1/sqrt(n_features)), comma separated."""
    out = []
    for t in value if isinstance(value, (list, tuple)) else str(value).split(","):
        if t is None or t == "auto":
            out.append(None)
            continue
        try:
            d = float(t)
        except (TypeError, ValueError):
            raise FisherError(f"--density {t!r}: expected a number in (0, 1] or 'auto'") from None
        if not 0 < d <= 1:
            raise FisherError(f"--density {t}: must be in (0, 1] (or 'auto' for 1/sqrt(n_features))")
        if d < MIN_DENSITY:
            raise FisherError(f"--density {t}: below 2^-40 = {MIN_DENSITY:.3g}, the smallest density a projection "
                              "resolves; pass a larger one")
        out.append(d)
    return out


def _splits(value) -> list[str] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(t).strip() for t in items if str(t).strip()]


@dataclass(kw_only=True)
class EmbedOptions(RayOptions):
    """Options of ``fisher embed`` (projection defaults: paper eq. 1 and sec. 5.2)."""
    prior: str | None = option(None, help="prior checkpoint directory (from `fisher train-prior`) or builtin:NAME; "
                                          "not used by --kind pixel")
    data: str = option(help="prepared data directory (from `fisher prepare`)")
    out: str = option(help="embedding directory to write (local path or s3:// gs:// URI)")
    kind: str = option("fisher", choices=("fisher", "activation", "pixel", "pixelvae", "realnvp"),
                       help="Fisher scores (the method), hidden activations (the paper's baseline), the "
                            "pixels themselves (the pixel-space baseline), or the latent of a --prior pixelvae or "
                            "realnvp model (the seed papers' baselines); the last three are unprojected "
                            "(--dim/--density unused)")
    dim: list = option(default_factory=lambda: [16384], parse=_dims,
                       help="projection dimension(s), comma separated (paper: 16384)")
    density: list = option(default_factory=lambda: [None], parse=_densities,
                           help="projection density(ies) in (0, 1], comma separated; 'auto' = 1/sqrt(n_features)")
    seed: int = option(0, help="projection seed (same seed = same matrix everywhere)")
    reference: str | None = option(None, help="--kind pixel: the image column to embed (default grey where the "
                                              "data keeps MNIST's grey originals, else image)")
    splits: list | None = option(None, parse=_splits, help="comma-separated splits to embed (default: all)")
    standardize: bool = option(False, help="standardize each coordinate (fitted on train)")
    pca: int | None = option(None, help="reduce to this many PCA components (fitted on train)")
    actors: int = option(1, help="actors in the pool")
    gpu: bool = option(False, help="one GPU per actor")
    cpus_per_actor: float = option(0.5, help="CPUs reserved per actor (fractional allowed)")
    batch_size: int = option(256, help="images per Ray Data batch")
    chunk_size: int | None = option(None, help="images per gradient pass inside a batch (memory bound; part of the "
                                               "bitwise result; default 64 for priors of up to 2M features, 32 above)")

    def __post_init__(self):
        super().__post_init__()
        self.dim, self.density, self.splits = _dims(self.dim), _densities(self.density), _splits(self.splits)
        from fisher.embedding import EMBEDDINGS
        if EMBEDDINGS.get(self.kind).cls.needs_prior and not self.prior:
            raise FisherError(f"--prior: required by --kind {self.kind} (a `fisher train-prior` directory or "
                              "builtin:NAME; see `fisher priors`)")
        at_least(self, 1, "chunk_size", "batch_size", "actors", "pca")
        at_most(self, 1 << 20, "chunk_size", "batch_size", "pca")
        at_most(self, 1024, "actors")
        seeds(self, "seed")
        positive(self, "cpus_per_actor")
        ray_quantities(self, "cpus_per_actor")
        from fisher.embedding import EmbedSpec
        names = [EmbedSpec(d, p).column(False) for d in self.dim for p in self.density]
        same = next((c for c in names if names.count(c) > 1), None)
        if same:
            raise FisherError(f"--dim {','.join(map(str, self.dim))} --density "
                              f"{','.join('auto' if p is None else str(p) for p in self.density)}: two projections "
                              f"share the column name {same} (dimensions repeated, or densities equal to 6 digits); "
                              "pass distinct values")


def register(sub) -> None:
    p = sub.add_parser("embed", help="Fisher-score or activation embeddings of prepared shards (Ray Data)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, EmbedOptions)
    p.set_defaults(func=run, options=EmbedOptions)


class _ScoreActor:
    """Ray Data actor: one Embedder per process, applied to pyarrow batches."""

    def __init__(self, prior: str, kind: str, specs: list, shape, seed: int, chunk: int, threads: int, gpu: bool,
                 column: str = "image", levels: int | None = None):
        import ray
        import torch

        from fisher.embedding import Embedder, EmbedSpec
        from fisher.malloc import keep_freed_memory
        from fisher.priors import load_prior
        torch.set_num_threads(threads)
        keep_freed_memory()           # this process scores batch after batch: reuse the memory, not fresh pages
        device = runtime_device(gpu)
        self.shape = shape
        self.node = ray.get_runtime_context().get_node_id()     # recorded per shard in the manifest
        self.embedder = Embedder(load_prior(prior) if prior else None, kind, [EmbedSpec(**s) for s in specs], shape,
                                 seed=seed, chunk_size=chunk, device=device, levels=levels)
        self.column = column

    def __call__(self, batch: pa.Table) -> dict:
        from fisher.data import decode_images
        out = self.embedder(decode_images(batch, self.shape, column=self.column))
        return {"id": np.asarray(batch["id"].to_pylist(), dtype=object),
                "path": np.asarray(batch["path"].to_pylist(), dtype=object),
                _NODE: np.full(batch.num_rows, self.node, dtype=object), **out}


def run(args: EmbedOptions) -> None:
    from fisher.embedding import EmbedSpec, feature_count
    from fisher.priors import load_prior, prior_location

    from fisher.embedding import EMBEDDINGS
    data_manifest = read_manifest(args.data, "prepare")
    shape = data_manifest["image_shape"]
    kind = EMBEDDINGS.build(args.kind)
    prior_manifest, model = {}, None
    if kind.needs_prior:
        prior_manifest = read_manifest(prior_location(args.prior), "train-prior")
        if prior_manifest.get("inputs", {}).get("data") not in (None, manifest_hash(data_manifest)) and \
                not str(args.prior).startswith("builtin:"):      # a builtin's data is its own (`fisher priors`)
            console.say(f"note: {args.prior} was trained on other data than {args.data}")
        model = load_prior(args.prior)
    elif args.prior:
        console.say(f"note: --kind {args.kind} does not use --prior {args.prior}")
    column, levels = "image", None
    if kind.needs_levels:
        from fisher.data import reference_column
        column, levels = reference_column(data_manifest, args.reference, args.data)
    elif args.reference:
        raise FisherError(f"--reference {args.reference}: only for --kind pixel (the other kinds embed what the "
                          "prior models: the image column)")
    n = feature_count(model, args.kind, shape)
    if args.chunk_size is None:
        args.chunk_size = default_chunk(n)
    specs = [EmbedSpec(d, p) for d, p in itertools.product(args.dim, args.density)] if kind.projected \
        else [EmbedSpec(n, None)]
    have = sorted({s["split"] for s in data_manifest["shards"]})
    splits = args.splits or have
    missing = [s for s in splits if s not in have]
    if missing:
        raise FisherError(f"--splits {','.join(splits)}: {args.data} has no split {', '.join(map(repr, missing))} "
                          f"(has {', '.join(have) or 'none'}); pass --splits with those names")
    shards = [s for s in data_manifest["shards"] if s["split"] in splits]
    if model is not None:   # a prior of other images (another channel count or levels) fails on every batch in Ray
        from fisher.data import data_levels
        want = {"channels": int(shape[2]), "levels": data_levels(data_manifest)}
        got = {k: getattr(getattr(model, "config", None), k, None) for k in want}
        bad = [k for k in want if got[k] is not None and got[k] != want[k]]
        if bad:
            raise FisherError(f"--prior {args.prior}: models images with {', '.join(f'{k}={got[k]}' for k in bad)}, "
                              f"but {args.data} holds {', '.join(f'{k}={want[k]}' for k in bad)}; pass a prior "
                              "trained on this kind of data")
    if kind.projected:
        need = sum(estimated_bytes(n, s.dim, s.density or n ** -0.5) for s in specs)
        if args.kind == "fisher":   # and the gradient pass, one chunk at a time (the prior fits the data)
            import torch
            h, w, c = (int(v) for v in shape)
            need += scores_bytes(lambda: copy.deepcopy(model).to("meta"),
                                 lambda m, k: m.log_prob(torch.zeros(k, c, h, w)), args.chunk_size)
        check_memory(args, args.actors * need, f"--dim {','.join(map(str, args.dim))} x --density with {n} features, "
                     f"--chunk-size {args.chunk_size}, in {args.actors} actor(s)")
    if args.standardize or args.pca:    # fitted on train after the embedding pass: checked before it
        if "train" not in splits:
            raise FisherError("--standardize/--pca need the train split among --splits")
        width, rows = min(s.dim for s in specs), int(data_manifest["counts"].get("train", 0))
        if args.pca and args.pca > min(width, rows):
            raise FisherError(f"--pca {args.pca}: larger than the embedding ({width}) or the train split ({rows}); "
                              "pass a smaller --pca")
    check_shards(args.data, data_manifest, splits, columns=("id", column))   # before anything is written
    plan = {"kind": args.kind, "seed": args.seed, "n_features": n, "chunk_size": args.chunk_size,
            "specs": [{"dim": s.dim, "density": s.density} for s in specs], "splits": splits,
            "prior": manifest_hash(prior_manifest) if prior_manifest else None,
            "prior_weights_sha256": prior_manifest.get("weights_sha256"),
            "data": manifest_hash(data_manifest), **({"column": column, "levels": levels} if levels else {})}
    claim_output(args.out, "embed", plan)

    todo = [s for s in shards if not exists(join(args.out, s["file"]))]
    _check_done(args, [s for s in shards if s not in todo], plan)
    console.say(f"embed: {len(shards) - len(todo)} of {len(shards)} shards already done; "
          f"{args.kind} features n={n}; columns "
          + ", ".join(s.column(len(specs) == 1) for s in specs))
    timing = _run_pool(args, todo, shape, plan) if todo else {}

    columns = {s.column(len(specs) == 1): {"dim": s.dim, "density": s.density if s.density else 1 / n ** 0.5}
               for s in specs} if kind.projected else {"z": {"dim": n, "density": None, "projected": False, "source": column}}
    extra = {}
    if args.standardize or args.pca:
        extra["transform"] = _fit_and_apply(args, shards, list(columns))
        columns.update({f"{c}_t": {"dim": args.pca or columns[c]["dim"], "transformed_from": c} for c in list(columns)})
    write_manifest(args.out, "embed", plan, inputs={"prior": plan["prior"], "data": plan["data"]},
                   prior=args.prior, data=args.data, columns=columns, image_shape=shape,
                   shards=[s["file"] for s in shards],
                   counts={sp: sum(_rows(args.data, s) for s in shards if s["split"] == sp) for sp in splits},
                   projection={"family": "li2006-sparse-eq1", "seed": args.seed, "n_features": n,
                               "generator": "numpy default_rng([seed, block, dim, density*2^40]), 65536-column blocks"}
                   if kind.projected else None,
                   timing=timing, **extra)
    console.say(f"embeddings written to {args.out}")


def _rows(data_dir: str, shard: dict) -> int:
    if "rows" in shard:
        return int(shard["rows"])
    fs, path = resolve(join(data_dir, shard["file"]))
    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


def _check_done(args, done: list[dict], plan: dict) -> None:
    """Output shards already there (a rerun) must be complete and come from this plan (seed, prior, ...)."""
    from fisher.embedding import check_shard_meta
    for s in done:
        uri = join(args.out, s["file"])
        meta = parquet_metadata(uri, _rows(args.data, s), fix="delete it and rerun the same command")
        check_shard_meta(uri, meta.schema.to_arrow_schema(), plan, args.out)


POOL_ATTEMPTS = 3    # passes of the actor pool over the shards not yet written, when the cluster loses an actor
ACTOR_INIT_DEATHS = 2    # pool actors in a row that may die before they run, each replaced by Ray Data


def _run_pool(args, todo: list[dict], shape, plan: dict) -> dict:
    """:func:`_embed_shards`; a failure inside Ray becomes one line, naming the input shard when one is unreadable
    (corrupt pages pass the footer check and only fail when a worker decodes them). When the cluster loses an
    actor in a way Ray Data does not recover from (an actor that dies before it ran is replaced by Ray Data
    itself, see ``ACTOR_INIT_DEATHS``), the pool runs again over the shards not written yet, up to
    ``POOL_ATTEMPTS`` passes: written shards are whole (written atomically) and every row is a pure function
    of its image, so the result is the same."""
    try:
        resources = init_ray(args)
        check_fits(args, {"CPU": args.cpus_per_actor, "GPU": int(args.gpu)},
                   {"CPU": f"--cpus-per-actor {args.cpus_per_actor:g}", "GPU": "--gpu"})
        started, nodes, images = time.time(), {}, sum(_rows(args.data, s) for s in todo)
        for attempt in range(1, POOL_ATTEMPTS + 1):
            try:
                timing = _embed_shards(args, todo, shape, plan, resources, nodes)
                break
            except Exception as e:
                if attempt == POOL_ATTEMPTS or not lost_to_the_cluster(e):
                    raise
                traceback.clear_frames(e.__traceback__)      # closes the failed pass's progress bar now
                todo = [s for s in todo if not exists(join(args.out, s["file"]))]
                if not todo:                          # lost after the last shard was written
                    timing = {"nodes": {n: sorted(v) for n, v in sorted(nodes.items())}}
                    break
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                console.say(f"embed: the cluster lost an actor ({lines[-1] if lines else type(e).__name__}); "
                            f"running the pool again over the {len(todo)} shards not written yet "
                            f"(pass {attempt + 1} of {POOL_ATTEMPTS})")
        return {**timing, "images": images, "seconds": round(time.time() - started, 3), "passes": attempt}
    except FisherError:
        raise
    except Exception as e:      # ray.exceptions.RayTaskError, ...
        traceback.clear_frames(e.__traceback__)     # closes the pool's progress bar now, not after the error line
        for s in todo:
            read_table(join(args.data, s["file"]))          # FisherError naming a corrupt shard
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise FisherError(f"{args.out}: embedding failed ({': '.join([type(e).__name__, *lines[-1:]])}); finished "
                          "shards are kept: fix the cause (see the Ray log above) and rerun the same command") from e


def _embed_shards(args, todo: list[dict], shape, plan: dict, resources: dict, nodes: dict) -> dict:
    """Run the actor pool over ``todo`` shards; returns timings (seconds, images). ``nodes`` (Ray node id ->
    shards it computed rows of) is filled in place, so it keeps what earlier passes did."""
    from ray.data import ActorPoolStrategy

    files = [join(args.data, s["file"]) for s in todo]
    expected = {s["file"]: _rows(args.data, s) for s in todo}
    column = plan.get("column", "image")
    ds = read_shards(files, ["id", column, "path"], include_paths=True)
    threads = 1 if args.gpu else max(1, worker_threads(resources, args.actors))
    ds = ds.map_batches(
        _ScoreActor, batch_size=args.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=dict(prior=args.prior if plan["prior"] else None, kind=args.kind,
                                   specs=plan["specs"], shape=shape, seed=args.seed, chunk=args.chunk_size, threads=threads, gpu=args.gpu,
                                   column=column, levels=plan.get("levels")),
        compute=ActorPoolStrategy(size=args.actors),
        num_gpus=1 if args.gpu else 0, num_cpus=args.cpus_per_actor)
    # One output block per batch: Ray Data holds an actor's output until it exceeds target_max_block_size
    # (128 MiB: 2048 rows at 16384 dims) or its input bundle ends, so shards would reach the driver in
    # bursts, late. 3/4 of a batch's vectors: every full batch exceeds it, and none is sliced (that takes 1.5x).
    ds.context.target_max_block_size = 3 * args.batch_size * 4 * sum(s["dim"] for s in plan["specs"]) // 4
    # Ray Data's default (0) fails the whole pass when one pool actor dies before it ran: what a node lost
    # while the actor was pending on it does (the autoscaling test met it, "the actor never ran"). A
    # replacement is started instead; a constructor that always fails still fails after this many.
    ds.context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
    pending: dict[str, list] = {}
    meta = {k: plan[k] for k in ("kind", "seed", "prior", "chunk_size")}
    bar = console.progress(sum(expected.values()), "embed")
    started, first, first_rows, largest = time.time(), None, 0, 0
    # One block at a time, as soon as it exists: with prefetching, Ray Data's iterator waits for block k+1
    # before it hands over block k (the whole batch of compute after it).
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        if first is None:
            first, first_rows = time.time(), len(batch["id"])
        largest = max(largest, len(batch["id"]))
        for path in np.unique(batch["path"]):
            name = str(path).rsplit("/", 1)[-1]
            sel = batch["path"] == path
            for node in np.unique(batch[_NODE][sel]):
                nodes.setdefault(str(node), set()).add(name)
            pending.setdefault(name, []).append({k: v[sel] for k, v in batch.items() if k not in ("path", _NODE)})
            got = sum(len(p["id"]) for p in pending[name])
            if got == expected[name]:
                parts = pending.pop(name)
                ids = np.concatenate([p["id"] for p in parts])
                cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "id"}
                atomic_write_table(join(args.out, name), embedding_table(ids, cols, meta))
        bar.update(len(batch["id"]))
    bar.close()
    if pending:
        raise FisherError(f"{args.out}: shards {sorted(pending)} received fewer rows than their inputs hold; rerun")
    end, images = time.time(), sum(expected.values())
    steady = round((images - first_rows) / (end - first), 3) if images > first_rows and end > first else None
    return {"images": images, "seconds": round(end - started, 3), "first_batch_seconds": round(first - started, 3),
            "steady_images_per_second": steady, "largest_block_rows": largest,
            "nodes": {n: sorted(s) for n, s in sorted(nodes.items())}}


def _fit_and_apply(args, shards: list[dict], columns: list[str]) -> dict:
    """Fit standardization/PCA per column on the train split; add ``<column>_t`` to every shard."""
    from fisher.embedding import fit_transform
    train = [s["file"] for s in shards if s["split"] == "train"]
    if not train:
        raise FisherError("--standardize/--pca need the train split among --splits")
    transforms, arrays = {}, {}
    for c in columns:
        z = np.concatenate([column_array(read_table(join(args.out, f), [c])[c]) for f in train])
        t = fit_transform(z, standardize=args.standardize, pca_dim=args.pca, seed=args.seed)
        transforms[c] = t
        arrays.update({f"{c}.{k}": v for k, v in t.arrays().items()})
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(join(args.out, "transform.npz"), buf.getvalue())
    for s in shards:
        uri = join(args.out, s["file"])
        table = read_table(uri)
        for c, t in transforms.items():
            if f"{c}_t" in table.column_names:
                table = table.drop_columns([f"{c}_t"])
            z = t(column_array(table[c]))
            table = table.append_column(f"{c}_t", vector_column(z))
        atomic_write_table(uri, table)
    return {"file": "transform.npz", "standardize": args.standardize, "pca": args.pca, "fitted_on": "train"}
