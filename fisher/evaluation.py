"""Interpolation FID (paper Algorithm 1, sec. 4.3) and the decoding of
interpolation strips and attribute edits (Figures 2, 4, 5).

Algorithm 1 for several mixing coefficients is a list of tasks. For N fixed
random pairs (:func:`fisher.manipulation.random_pairs`, one seed, the same
pairs for every α) and coefficients α₀ … α_{A-1}, task ``t = a·N + i`` is
"decode (1 - α_a) z[p_i,0] + α_a z[p_i,1] and take its Inception pool3
features". :class:`InterpolationFeatures` maps any batch of task ids to
features (one per process: it holds the decoder and the Inception network),
so the tasks can be split among workers in any way; :class:`FIDAccumulator`
gathers features per α in task order and computes each α's FID (and KID,
:func:`kid_of`, against the real feature rows the statistics keep) as soon as its N tasks are in. :func:`interpolation_fid` is
the whole protocol in one process (a notebook on one GPU).

Decoded images are the decoder's expected value E[x̂] on [0, 1]
(:meth:`fisher.decoders.Decoder.generate`: the expected image E[x̂] for the conv
decoders, a sample for decoders that generate by sampling); real images are the dataset's values
scaled to [0, 1] (:func:`fisher.fid.to_unit_float`). The Fréchet distance is
pytorch-fid's (:func:`fisher.fid.fid`).

The FID-vs-α tables and plots of Figures 3b / 7 are :mod:`fisher.reports.figure3b` and the paper's
numbers :mod:`fisher.reports.paper`; ``fid_table``, ``fid_plot``, ``PAPER_MNIST_FID`` and
``PAPER_CELEBA_FID`` stay importable from here.

Pure PyTorch/NumPy/pyarrow: never imports ray.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fisher.fid import FIDStats, fid, inception_features, kid, stats_from_features, to_unit_float
from fisher.io import FisherError
from fisher.manipulation import ALPHAS, random_pairs
from fisher.reports.figure3b import fid_plot, fid_table  # noqa: F401  (re-exported)
from fisher.reports.paper import PAPER_CELEBA_FID, PAPER_MNIST_FID  # noqa: F401  (re-exported)


# ---------------------------------------------------------------- mixtures and decoding

def mixtures(z, pairs, pair_idx, alpha) -> torch.Tensor:
    """Row k: (1 - alpha[k]) z[pairs[pair_idx[k], 0]] + alpha[k] z[pairs[pair_idx[k], 1]].

    Uses ``torch.lerp`` like :func:`fisher.manipulation.interpolate`: α = 0 gives z₁ and α = 1 gives z₂
    bitwise. ``alpha`` is a scalar or one value per row.
    """
    z = torch.as_tensor(z)
    p = torch.as_tensor(np.asarray(pairs), dtype=torch.long)[torch.as_tensor(np.asarray(pair_idx), dtype=torch.long)]
    a = torch.as_tensor(np.asarray(alpha, dtype=np.float64)).to(z.dtype).reshape(-1, 1)
    return torch.lerp(z[p[:, 0]], z[p[:, 1]], a.expand(len(p), 1))


@torch.no_grad()
def decode_batches(decoder, z, levels: int, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """``decoder.generate`` of every row of ``z`` (float (N, C, H, W) on the CPU, clamped to [0, 1]), in eval
    mode: E[x̂] for mean decoders, a sample for sampling ones. ``levels`` is unused (kept for callers)."""
    decoder.eval()
    z = torch.as_tensor(z)
    out = [decoder.generate(z[i:i + batch_size].to(device)).clamp_(0, 1).cpu()
           for i in range(0, len(z), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def decode_interpolations(decoder, z, pairs, alphas, levels: int, batch_size: int = 256,
                          device="cpu") -> torch.Tensor:
    """Figures 2c/4c: E[Dec((1 - α) z₁ + α z₂)] for every pair and α, float (P, A, C, H, W) in [0, 1]."""
    n, a = len(pairs), len(alphas)
    pair_idx = np.repeat(np.arange(n), a)
    alpha = np.tile(np.asarray(alphas, dtype=np.float64), n)
    images = decode_batches(decoder, mixtures(z, pairs, pair_idx, alpha), levels, batch_size, device)
    return images.reshape(n, a, *images.shape[1:])


def edit_grid_images(decoder, z, delta, scale: float, levels: int, batch_size: int = 256,
                     device="cpu") -> torch.Tensor:
    """Figure 5: E[Dec(z - scale·δ)], E[Dec(z)], E[Dec(z + scale·δ)] per row of ``z``: float (N, 3, C, H, W)."""
    z, delta = torch.as_tensor(z), torch.as_tensor(delta).to(torch.as_tensor(z).dtype)
    zs = torch.stack([z - scale * delta, z, z + scale * delta], dim=1)       # (N, 3, dim)
    images = decode_batches(decoder, zs.reshape(-1, z.shape[1]), levels, batch_size, device)
    return images.reshape(len(z), 3, *images.shape[1:])


# ---------------------------------------------------------------- Algorithm 1 as tasks

def split_tasks(task_ids, n_pairs: int, alphas) -> tuple[np.ndarray, np.ndarray]:
    """Task t = a·N + i → (pair index i, α index a)."""
    t = np.asarray(task_ids, dtype=np.int64)
    if t.size and (t.min() < 0 or t.max() >= n_pairs * len(alphas)):
        raise FisherError(f"task ids must lie in [0, {n_pairs * len(alphas)}) for {n_pairs} pairs × "
                          f"{len(alphas)} alphas")
    return t % n_pairs, t // n_pairs


class InterpolationFeatures:
    """Maps task ids (see the module docstring) to Inception pool3 features, float32 [B, D].

    Holds one decoder, one Inception network and the embeddings of the split, so a worker builds it once
    and calls it on many batches. The pairs are fixed here, hence identical for every α.
    """

    def __init__(self, decoder, inception, z, pairs, alphas, levels: int, device="cpu",
                 inception_batch: int = 50):
        self.decoder, self.inception = decoder.to(device).eval(), inception.to(device).eval()
        self.z = torch.as_tensor(np.asarray(z))
        self.pairs = np.asarray(pairs, dtype=np.int64)
        self.alphas = np.asarray(alphas, dtype=np.float64)
        self.levels, self.device, self.inception_batch = int(levels), device, int(inception_batch)
        if self.pairs.ndim != 2 or self.pairs.shape[1] != 2 or (self.pairs.size and self.pairs.max() >= len(self.z)):
            raise FisherError(f"pairs {self.pairs.shape} do not index the {len(self.z)} embeddings")

    def images(self, task_ids) -> torch.Tensor:
        """Decoded mixtures of the tasks, float (B, C, H, W) in [0, 1]."""
        pair_idx, alpha_idx = split_tasks(task_ids, len(self.pairs), self.alphas)
        zmix = mixtures(self.z, self.pairs, pair_idx, self.alphas[alpha_idx])
        return decode_batches(self.decoder, zmix, self.levels, max(len(zmix), 1), self.device)

    def __call__(self, task_ids) -> np.ndarray:
        feats = inception_features(self.inception, self.images(task_ids), self.inception_batch, self.device)
        return feats.astype(np.float32)     # the network computes in float32: lossless


def real_features(inception, images, levels: int, batch_size: int = 50, device="cpu") -> np.ndarray:
    """Pool3 features float32 [N, D] of dataset images (uint8 (N, H, W, C), values in [0, levels))."""
    x = torch.from_numpy(to_unit_float(images, levels))
    return inception_features(inception, x, batch_size, device).astype(np.float32)


def frechet(features, real: FIDStats) -> tuple[float, bool]:
    """(FID of ``features`` [N, D] against ``real``, regularized?).

    Exactly ``fisher.fid.fid(stats_from_features(features), real)``. When pytorch-fid gives up on a
    near-singular product (few samples: covariances of rank < D) with a large imaginary part, the
    distance is recomputed with 1e-6 added to both diagonals (pytorch-fid's own fallback for
    non-finite square roots) and flagged.
    """
    gen = stats_from_features(np.asarray(features, dtype=np.float64))
    gen.features = np.asarray(features, dtype=np.float64)     # all rows: fid() may work in their span
    try:
        return fid(gen, real), False
    except ValueError as first:
        eye = np.eye(len(gen.mu)) * 1e-6
        try:
            reg = fid(FIDStats(gen.mu, gen.sigma + eye, gen.count), FIDStats(real.mu, real.sigma + eye, real.count))
            return reg, True
        except ValueError:
            raise FisherError(f"FID is numerically undefined for {gen.count} generated vs {real.count} real images "
                              f"({first}); use more pairs and real images") from first


def fid_from_features(features, real: FIDStats) -> float:
    """FID of generated features [N, D] against real statistics (:func:`frechet` without the flag)."""
    return frechet(features, real)[0]


KID_SUBSETS = 100          # KID rounds per α (and for the floor)
KID_SUBSET_SIZE = 1000     # rows per round: m = min(1000, N generated, real rows kept)
KID_SEED = 0               # the subset draws: fisher.fid.kid(..., seed=KID_SEED)
# Cost of one KID: KID_SUBSETS × 3 kernel matrices of m × m from D = 2048 features, ≈ 6·10¹¹ multiply-adds
# at m = 1000 (≈ 25 s on 2 CPU cores in float64, about one 2048-d Fréchet distance), independent of N beyond m.


def kid_of(features, real_features, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
           seed: int = KID_SEED) -> dict:
    """KID ({mean, std, stderr, subsets, subset_size}) of generated features against real ones, exactly
    :func:`fisher.fid.kid` with this module's protocol constants."""
    return kid(features, real_features, subsets=subsets, subset_size=subset_size, seed=seed)


class FIDAccumulator:
    """Collects (task ids, features) batches in any order; each α's FID (and KID) is computed once its N tasks
    are in.

    Features are stored in task order (float32, N × D per α still open), so the result does not depend
    on how tasks were batched or which worker ran them. Repeated task ids (a retried batch) count once.
    KID (:func:`kid_of`) is computed against ``real_features`` (default ``real.features``, the rows a
    statistics cache keeps) when there are any; ``self.kid`` then holds {α: {mean, std, stderr, subsets,
    subset_size}}. ``self.seconds`` is the time spent in Fréchet distances and in KID.
    """

    def __init__(self, n_pairs: int, alphas, real: FIDStats, real_features=None, kid_subsets: int = KID_SUBSETS,
                 kid_subset_size: int = KID_SUBSET_SIZE, kid_seed: int = KID_SEED):
        self.n, self.alphas, self.real = int(n_pairs), [float(a) for a in alphas], real
        self.real_features = real.features if real_features is None else real_features
        self.kid_args = {"subsets": int(kid_subsets), "subset_size": int(kid_subset_size), "seed": int(kid_seed)}
        self._feats: dict[int, np.ndarray] = {}
        self._seen = np.zeros((len(self.alphas), self.n), dtype=bool)
        self.fid: dict[float, float] = {}
        self.kid: dict[float, dict] = {}
        self.regularized: list[float] = []
        self.seconds = {"frechet": 0.0, "kid": 0.0}

    def add(self, task_ids, features) -> list[float]:
        """Store a batch; returns the α values completed by it (their FID is now in ``self.fid``)."""
        features = np.asarray(features)
        pair_idx, alpha_idx = split_tasks(task_ids, self.n, self.alphas)
        if len(features) != len(pair_idx):
            raise FisherError(f"{len(pair_idx)} task ids but {len(features)} feature rows")
        done = []
        for a in np.unique(alpha_idx):
            alpha = self.alphas[a]
            if alpha in self.fid:
                continue
            sel = alpha_idx == a
            buf = self._feats.get(a)
            if buf is None:
                buf = self._feats[a] = np.empty((self.n, features.shape[1]), np.float32)
            buf[pair_idx[sel]] = features[sel]
            self._seen[a, pair_idx[sel]] = True
            if self._seen[a].all():
                feats = self._feats.pop(a)
                t0 = time.perf_counter()
                self.fid[alpha], reg = frechet(feats, self.real)
                t1 = time.perf_counter()
                if self.real_features is not None:
                    self.kid[alpha] = kid_of(feats, self.real_features, **self.kid_args)
                self.seconds["frechet"] += t1 - t0
                self.seconds["kid"] += time.perf_counter() - t1
                if reg:
                    self.regularized.append(alpha)
                done.append(alpha)
        return done

    def result(self) -> dict[float, float]:
        """{α: FID} in the order of ``alphas``; an error if any α is incomplete."""
        missing = [a for a in self.alphas if a not in self.fid]
        if missing:
            counts = {self.alphas[a]: int(self._seen[a].sum()) for a in range(len(self.alphas))}
            raise FisherError(f"interpolation FID incomplete: α {missing} lack features "
                              f"(received per α: {counts} of {self.n})")
        return {a: self.fid[a] for a in self.alphas}

    def kid_result(self) -> dict[float, dict]:
        """{α: KID dict} in the order of ``alphas`` (empty without real features); call after :meth:`result`."""
        return {a: self.kid[a] for a in self.alphas if a in self.kid}


def interpolation_fid(decoder, inception, z, real: FIDStats, levels: int, n_pairs: int = 50000,
                      alphas=ALPHAS, seed: int = 0, batch_size: int = 100, device="cpu") -> dict[float, float]:
    """Paper Algorithm 1 in one process: {α: FID} of N decoded interpolations of random pairs against ``real``."""
    pairs = random_pairs(len(z), n_pairs, seed)
    scorer = InterpolationFeatures(decoder, inception, z, pairs, alphas, levels, device)
    acc = FIDAccumulator(n_pairs, alphas, real)
    tasks = np.arange(n_pairs * len(alphas))
    for start in range(0, len(tasks), batch_size):
        batch = tasks[start:start + batch_size]
        acc.add(batch, scorer(batch))
    return acc.result()


# ---------------------------------------------------------------- rows of prepared data by id

def load_rows(data_dir: str, split: str, ids, columns=("id", "image")) -> dict[str, np.ndarray]:
    """Rows of a prepared split with the given ``ids``, in that order, reading one shard at a time.

    Returns {'id', and each of ``columns``: 'image' uint8 [N, H, W, C], 'grey' uint8 [N, H, W, C] (MNIST's grey
    originals, values 0..255), 'label' [N] or 'attrs' [N, 40]}.
    """
    from fisher.data import IMAGE_COLUMNS, data_references, decode_images
    from fisher.io import join, read_manifest, read_table
    manifest = read_manifest(data_dir, "prepare")
    lacking = [c for c in columns if c in IMAGE_COLUMNS and c not in data_references(manifest)]
    if lacking:
        raise FisherError(f"{data_dir}: no '{lacking[0]}' column (image columns: "
                          f"{', '.join(data_references(manifest))}); prepare the data again into a new --out")
    ids = np.asarray(ids).astype(str)
    want = pa.array(np.unique(ids).tolist(), pa.string())
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    if not files:
        raise FisherError(f"{data_dir}: no '{split}' split (has {sorted(manifest.get('counts', {}))})")
    cols = list(dict.fromkeys(["id", *columns]))
    parts = []
    for f in files:
        t = read_table(join(data_dir, f), cols)
        t = t.filter(pc.is_in(t["id"], value_set=want))
        if t.num_rows:
            parts.append(t)
    table = pa.concat_tables(parts) if parts else None
    got = np.asarray(table["id"].to_pylist()) if table is not None else np.asarray([], dtype=str)
    order = np.argsort(got, kind="stable")
    pos = np.clip(np.searchsorted(got, ids, sorter=order), 0, max(len(got) - 1, 0))
    found = (got[order[pos]] == ids) if len(got) else np.zeros(len(ids), bool)
    if not found.all():
        raise FisherError(f"{data_dir}: {int((~found).sum())} ids of split '{split}' are missing (e.g. "
                          f"{ids[~found][0]}); the embeddings come from another dataset")
    rows = pa.array(order[pos])
    table = table.take(rows)
    out = {"id": ids}
    for c in cols:
        if c == "id":
            continue
        if c in IMAGE_COLUMNS:
            out[c] = decode_images(table, manifest["image_shape"], c)
        elif c == "attrs":
            v = table[c].combine_chunks()
            out[c] = v.flatten().to_numpy().reshape(len(v), -1)
        else:
            out[c] = table[c].to_numpy()
    return out
