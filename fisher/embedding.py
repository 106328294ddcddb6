"""Embeddings z = P·e(x) of images (paper sec. 3.2 and 4.1).

``e(x)`` is an embedding kind from :data:`EMBEDDINGS`: the Fisher score
∇_θ log p_θ(x) (kind ``fisher``) or, for the baseline, the prior's hidden
activations (kind ``activation``); ``P`` is a seeded sparse projection
(:mod:`fisher.projection`, paper eq. 1). Several (dim, density) pairs come from
one gradient pass. The kind ``pixel`` is the pixel-space baseline: the image itself, unprojected.
The kinds ``pixelvae`` and ``realnvp`` are the seed papers' latent-variable baselines: the latent of
such a model (trained with ``fisher train-prior --prior pixelvae|realnvp``), unprojected.
Optional standardization and PCA (paper sec. 5.2:
16384 → 4096) are fitted on the train split and then applied
identically to every split.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from fisher.errors import FisherError
from fisher.priors import Prior, to_model_input
from fisher.projection import ProjectionStack, SparseProjection
from fisher.registry import Registry
from fisher.scores import activations, default_chunk, fisher_scores, n_features


class EmbeddingKind:
    """An embedding kind e(x) of a prior (registered in :data:`EMBEDDINGS`): its length, and the
    projected embeddings of a batch ``x`` (B, C, H, W) for every projection.

    ``projected = False``: e(x) is used as it is (one column ``z`` of length :meth:`n_features`, no
    projection); ``needs_prior = False``: ``model`` may be None."""
    projected = True
    needs_prior = True
    needs_levels = False        # True: project() returns sub-pixel values, which Embedder scales to [0, 1]

    def n_features(self, model: Prior, image_shape) -> int:
        raise NotImplementedError

    def project(self, model: Prior, x: torch.Tensor, projections: list[SparseProjection], stack: ProjectionStack,
                chunk_size: int) -> list[torch.Tensor]:
        raise NotImplementedError


EMBEDDINGS = Registry("embedding kind", EmbeddingKind, base_name="fisher.embedding.EmbeddingKind")


@EMBEDDINGS.register("fisher")
class FisherScoreKind(EmbeddingKind):
    """The method (paper sec. 3.2): exact per-image ∇_θ log p_θ(x) over the free parameters."""

    def n_features(self, model, image_shape):
        if not model.exact_likelihood:
            raise FisherError(f"--kind fisher: prior {model.registered_name!r} has no exact log-likelihood (its "
                              f"log_prob is the {model.bound} bound), so no Fisher score; embed its latent with "
                              f"--kind {model.registered_name}")
        return n_features(model)

    def project(self, model, x, projections, stack, chunk_size):
        return fisher_scores(model, x, stack, chunk_size=chunk_size)


@EMBEDDINGS.register("activation")
class ActivationKind(EmbeddingKind):
    """The paper's baseline (sec. 5.1): the prior's :meth:`Prior.hidden` activations, flattened."""

    def n_features(self, model, image_shape):
        if type(model).hidden is Prior.hidden:
            raise FisherError(f"--kind activation: prior {model.registered_name!r} defines no baseline activations "
                              "(they are an autoregressive prior's); "
                              + (f"embed its latent with --kind {model.registered_name}"
                                 if model.registered_name in EMBEDDINGS else "use --kind fisher"))
        return model.hidden_size(image_shape)

    def project(self, model, x, projections, stack, chunk_size):
        zs = None
        for start in range(0, x.shape[0], chunk_size):
            part = stack.project(activations(model, x[start:start + chunk_size]))
            zs = part if zs is None else [torch.cat([u, v]) for u, v in zip(zs, part)]
        return zs


@EMBEDDINGS.register("pixel")
class PixelKind(EmbeddingKind):
    """The pixel-space baseline (paper sec. 5.2 compares its interpolations with pixel interpolation):
    e(x) = x on [0, 1] (sub-pixel values / (levels - 1), :class:`Embedder`'s ``levels``) in (C, H, W)
    order, unprojected so that the decoder ``pixels`` (:mod:`fisher.decoders.pixels`) decodes
    (1 - α) z₁ + α z₂ as the cross-fade of the two images. Needs no prior."""
    projected = False
    needs_prior = False
    needs_levels = True

    def n_features(self, model, image_shape):
        h, w, c = (int(v) for v in image_shape)
        return h * w * c

    def project(self, model, x, projections, stack, chunk_size):
        return [x.flatten(1).float()]


class LatentKind(EmbeddingKind):
    """The latent of a latent-variable model registered as a prior under the kind's own name: PixelVAE's
    posterior mean E[z | x], RealNVP's exact f(x) (:class:`fisher.priors.base.Prior`'s ``encode``);
    unprojected, so the model's own decoder (:mod:`fisher.decoders.latent`) decodes it."""
    projected = False

    def _check(self, model: Prior) -> None:
        if model.registered_name != self.registered_name:
            raise FisherError(f"--kind {self.registered_name}: needs a `fisher train-prior --prior "
                              f"{self.registered_name}` model as --prior, got a {model.registered_name!r} prior")

    def n_features(self, model, image_shape):
        self._check(model)
        return model.latent_size(image_shape)

    @torch.no_grad()
    def project(self, model, x, projections, stack, chunk_size):
        self._check(model)
        return [torch.cat([model.encode(x[i:i + chunk_size]) for i in range(0, len(x), chunk_size)])]


@EMBEDDINGS.register("pixelvae")
class PixelVAEKind(LatentKind):
    """PixelVAE's posterior mean (Gulrajani et al. 2016; :mod:`fisher.priors.pixelvae`)."""


@EMBEDDINGS.register("realnvp")
class RealNVPKind(LatentKind):
    """RealNVP's latent f(x), all scales concatenated (Dinh et al. 2016; :mod:`fisher.priors.realnvp`)."""


KINDS = tuple(EMBEDDINGS.names())


@dataclass(frozen=True)
class EmbedSpec:
    """One requested projection: output dim and density (None = 1/sqrt(n_features))."""
    dim: int = 16384
    density: float | None = None

    def column(self, single: bool) -> str:
        if single:
            return "z"
        dens = "auto" if self.density is None else f"{self.density:g}"
        return f"z_d{self.dim}_p{dens}"


def feature_count(model: Prior, kind: str, image_shape) -> int:
    """Length of the unprojected embedding for ``kind`` on images of ``image_shape`` (H, W, C)."""
    return EMBEDDINGS.build(kind).n_features(model, image_shape)


class Embedder:
    """Maps uint8 images (N, H, W, C) to {column: float32 array (N, dim)}.

    ``levels``: the images' sub-pixel levels, which unprojected kinds (``pixel``) scale by.

    Builds its projections once from (seed, n_features, dim, density), so every
    process that constructs an Embedder with the same arguments computes the
    same embeddings.
    """

    def __init__(self, model: Prior, kind: str, specs: list[EmbedSpec], image_shape,
                 seed: int = 0, chunk_size: int | None = None, device: str = "cpu", levels: int | None = None):
        if kind not in EMBEDDINGS:
            raise ValueError(f"kind must be one of {KINDS}")
        self._kind = EMBEDDINGS.build(kind)
        if model is None and self._kind.needs_prior:
            raise ValueError(f"embedding kind {kind!r} needs a prior")
        self.model = model.to(device).eval() if model is not None else None
        self.kind, self.device = kind, device
        if self._kind.needs_levels and not (isinstance(levels, int) and levels >= 2):
            raise ValueError(f"embedding kind {kind!r} needs the images' levels (>= 2), got {levels!r}")
        self.levels = levels
        n = self._kind.n_features(model, image_shape)
        self.n_features = n
        self.chunk = default_chunk(n) if chunk_size is None else chunk_size
        if not self._kind.projected:
            specs = [EmbedSpec(n, None)]
        self.projections = [SparseProjection(n, s.dim, s.density, seed) for s in specs] if self._kind.projected \
            else []
        self.columns = [s.column(len(specs) == 1) for s in specs]
        self._stack = ProjectionStack(self.projections) if self.projections else None

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = to_model_input(images, self.device)
        zs = self._kind.project(self.model, x, self.projections, self._stack, self.chunk)
        if self._kind.needs_levels:
            zs = [z / (self.levels - 1) for z in zs]
        return {c: z.detach().cpu().numpy().astype(np.float32, copy=False) for c, z in zip(self.columns, zs)}

    def describe(self) -> dict:
        if not self.projections:
            return {"n_features": self.n_features, "chunk_size": self.chunk,
                    "columns": {"z": {"dim": self.n_features, "density": None, "seed": None}}}
        return {"n_features": self.n_features, "chunk_size": self.chunk,
                "columns": {c: {"dim": p.dim, "density": p.density, "seed": p.seed}
                            for c, p in zip(self.columns, self.projections)}}


@dataclass
class Transform:
    """Standardization and/or PCA fitted on train embeddings: z' = ((z - mean) / std) @ components.T"""
    mean: np.ndarray
    std: np.ndarray
    components: np.ndarray | None = None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        out = (z - self.mean) / self.std
        if self.components is not None:
            out = out @ self.components.T
        return out.astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def fit_transform(z_train: np.ndarray, standardize: bool = True, pca_dim: int | None = None,
                  seed: int = 0) -> Transform:
    """Fit standardization (per-coordinate mean/std) and optional PCA on the train split.

    Without ``standardize`` only the mean is removed before PCA. PCA uses a
    seeded randomized SVD (exact when ``pca_dim`` is close to the width).
    """
    z = torch.from_numpy(np.asarray(z_train, dtype=np.float32))
    mean = z.mean(0)
    std = z.std(0).clamp_min(1e-8) if standardize else torch.ones_like(mean)
    comps = None
    if pca_dim:
        if pca_dim > min(z.shape):
            from fisher.io import FisherError
            raise FisherError(f"--pca {pca_dim}: larger than the embedding ({z.shape[1]}) or the train split ({z.shape[0]})")
        zc = (z - mean) / std
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(zc, q=min(pca_dim + 10, min(z.shape)), niter=4)
        comps = v[:, :pca_dim].T.contiguous().numpy()
    return Transform(mean.numpy(), std.numpy(), comps)


# ---------------------------------------------------------------- storage format
def vector_column(z: np.ndarray) -> pa.Array:
    """float32 rows (N, dim) as an Arrow fixed-size-list column."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), z.shape[1])


def column_array(col) -> np.ndarray:
    """An Arrow fixed-size-list column back to a float32 array (N, dim)."""
    a = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return a.flatten().to_numpy().reshape(len(a), -1)


def embedding_table(ids: np.ndarray, columns: dict[str, np.ndarray], meta: dict) -> pa.Table:
    """One embedding shard: ``id`` plus one vector column per projection, rows sorted by id."""
    order = np.argsort(ids, kind="stable")
    cols = {"id": pa.array(ids[order].tolist(), pa.string())}
    cols.update({name: vector_column(z[order]) for name, z in columns.items()})
    return pa.table(cols).replace_schema_metadata({b"fisher": json.dumps(meta).encode()})


SHARD_META_KEYS = ("kind", "seed", "prior", "chunk_size")   # in every shard's metadata; must match the manifest


def check_shard_meta(uri: str, schema: pa.Schema, config: dict, where: str) -> None:
    """Refuse a shard written by another ``fisher embed`` run (another seed, prior, kind or chunk size)
    than the one ``config`` (the embed manifest's config) describes."""
    from fisher.io import FisherError
    try:
        meta = json.loads((schema.metadata or {}).get(b"fisher") or b"{}")
    except json.JSONDecodeError:
        meta = {}
    diff = [k for k in SHARD_META_KEYS if k in meta and k in config and meta[k] != config[k]]
    if diff:
        raise FisherError(f"{uri}: made with {', '.join(f'{k} {meta[k]!r}' for k in diff)}, but {where} with "
                          f"{', '.join(f'{k} {config[k]!r}' for k in diff)}; a shard of another `fisher embed` run "
                          "was mixed in: delete it and rerun `fisher embed` with the same options")


def _read_shard(dir_uri: str, manifest: dict, name: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, Z) of one shard, refusing shards of another run and non-finite values."""
    from fisher.io import FisherError, join, read_table
    uri = join(dir_uri, name)
    table = read_table(uri, ["id", column])
    check_shard_meta(uri, table.schema, manifest.get("config", {}), dir_uri)
    kind, dim = table.schema.field(column).type, manifest["columns"][column]["dim"]
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)) or \
            kind.list_size != dim:
        raise FisherError(f"{uri}: column '{column}' is {kind}, not the {dim}-dim float vectors "
                          f"{dir_uri}/manifest.json describes; delete it and rerun `fisher embed`")
    ids = np.asarray(table["id"].to_pylist())
    z = column_array(table[column]) if len(ids) else np.zeros((0, kind.list_size), np.float32)
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        raise FisherError(f"{uri}: column '{column}' holds NaN or Inf in {int(bad.sum())} of {len(z)} rows "
                          f"(e.g. id {ids[bad][0]}); delete it and rerun `fisher embed` (if it comes back, "
                          "the prior is broken: retrain it)")
    return ids, z


def _split_shards(dir_uri: str, manifest: dict, split: str, column: str) -> list[str]:
    from fisher.io import FisherError
    if column not in manifest["columns"]:
        raise FisherError(f"{dir_uri}: no column '{column}' (has {', '.join(manifest['columns'])}); pass --column")
    names = [s for s in manifest["shards"] if s.startswith(split + "-")]
    if not names:
        raise FisherError(f"{dir_uri}: no '{split}' split; rerun `fisher embed` with that split")
    return names


def read_embeddings(dir_uri: str, split: str, column: str = "z") -> tuple[np.ndarray, np.ndarray]:
    """(ids, Z float32 [N, dim]) of one split of an embedding directory, in id order.

    Every shard must come from the run its manifest describes and hold finite values (else FisherError)."""
    from fisher.io import read_manifest
    manifest = read_manifest(dir_uri, "embed")
    names = _split_shards(dir_uri, manifest, split, column)
    parts = [_read_shard(dir_uri, manifest, s, column) for s in names]
    seen: dict = {}
    for name, (ids, _) in zip(names, parts):
        _unique_ids(dir_uri, name, ids, seen)
    return np.concatenate([i for i, _ in parts]), np.concatenate([z for _, z in parts])


def _unique_ids(dir_uri: str, name: str, ids: np.ndarray, seen: dict) -> None:
    """Refuse an id that a shard repeats or that an earlier shard (``seen``: id → shard) already holds."""
    from fisher.io import FisherError, join
    values, counts = np.unique(ids, return_counts=True)
    twice = values[counts > 1]
    other = next((i for i in values if i in seen), None)
    if len(twice) or other is not None:
        where = "twice in this shard" if len(twice) else f"also in {seen[other]}"
        raise FisherError(f"{join(dir_uri, name)}: id '{twice[0] if len(twice) else other}' is {where}; every "
                          "image is embedded once: delete the copied shard and rerun `fisher embed`")
    seen.update(dict.fromkeys(values.tolist(), name))


def check_embeddings(dir_uri: str, column: str, splits=("train", "test")) -> None:
    """The checks of :func:`read_embeddings` on ``splits``, one shard in memory at a time: lets a stage
    refuse bad embeddings before it starts any work."""
    from fisher.io import read_manifest
    manifest = read_manifest(dir_uri, "embed")
    seen: dict = {}
    for split in splits:
        for name in _split_shards(dir_uri, manifest, split, column):
            _unique_ids(dir_uri, name, _read_shard(dir_uri, manifest, name, column)[0], seen)


def paired_manifests(emb_dir: str, data_dir: str, column: str) -> tuple[dict, dict]:
    """(embed manifest, prepare manifest) of embeddings and the data they were made from, refusing data
    other than the embeddings' and a column they lack, each in one line."""
    from fisher.io import FisherError, manifest_hash, read_manifest
    emb, data = read_manifest(emb_dir, "embed"), read_manifest(data_dir, "prepare")
    if emb.get("inputs", {}).get("data") != manifest_hash(data):
        raise FisherError(f"{emb_dir}: embeddings were made from other data than {data_dir}; "
                          "pass the --data used by `fisher embed`")
    if column not in emb["columns"]:
        raise FisherError(f"{emb_dir}: no column '{column}' (has {', '.join(emb['columns'])}); pass --column")
    return emb, data


def load_pairs(emb_dir: str, data_dir: str, split: str, column: str = "z") -> dict:
    """Embeddings joined to their images by ``id``: {'id', 'z' [N, dim], 'image' [N, H, W, C], targets}."""
    from fisher.data import load_prepared
    from fisher.io import FisherError
    ids, z = read_embeddings(emb_dir, split, column)
    data = load_prepared(data_dir, split)
    order = np.argsort(data["id"])
    pos = np.searchsorted(data["id"], ids, sorter=order)
    pos = np.clip(pos, 0, len(order) - 1)
    found = data["id"][order[pos]] == ids
    if not found.all():
        raise FisherError(f"{emb_dir}: {int((~found).sum())} ids of split '{split}' are not in {data_dir} "
                          f"(e.g. {ids[~found][0]}); embeddings and data come from different datasets")
    rows = order[pos]
    return {"id": ids, "z": z, **{k: v[rows] for k, v in data.items() if k != "id"}}
