"""Interpolation FID (paper Algorithm 1, sec. 4.3), interpolation strips and
attribute edits (Figures 2, 4, 5), and the FID-vs-α tables of Figures 3b / 7.

Algorithm 1 for several mixing coefficients is a list of tasks. For N fixed
random pairs (:func:`fisher.manipulation.random_pairs`, one seed, the same
pairs for every α) and coefficients α₀ … α_{A-1}, task ``t = a·N + i`` is
"decode (1 - α_a) z[p_i,0] + α_a z[p_i,1] and take its Inception pool3
features". :class:`InterpolationFeatures` maps any batch of task ids to
features (one per process: it holds the decoder and the Inception network),
so the tasks can be split among workers in any way; :class:`FIDAccumulator`
gathers features per α in task order and computes each α's FID against the
real statistics as soon as its N tasks are in. :func:`interpolation_fid` is
the whole protocol in one process (a notebook on one GPU).

Decoded images are the decoder's expected value E[x̂] on [0, 1]
(:func:`fisher.decoders.decode_mean`); real images are the dataset's values
scaled to [0, 1] (:func:`fisher.fid.to_unit_float`). The Fréchet distance is
pytorch-fid's (:func:`fisher.fid.fid`).

Pure PyTorch/NumPy/pyarrow: never imports ray.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fisher.decoders import decode_mean
from fisher.fid import FIDStats, fid, inception_features, stats_from_features, to_unit_float
from fisher.io import FisherError
from fisher.manipulation import ALPHAS, random_pairs

# Figure 3b (MNIST, 5-layer PixelCNN prior, conv decoder, N = 50 000 pairs).
PAPER_MNIST_FID = {
    "source": "paper, Figure 3b (MNIST)",
    "pairs": 50000,
    "rows": {
        "activation/conv": dict(zip(ALPHAS, (0.68, 0.60, 2.69, 12.84, 25.42))),
        "fisher/conv": dict(zip(ALPHAS, (1.21, 1.14, 1.03, 2.21, 5.43))),
    },
}


def _celeba(rows: dict) -> dict:
    return {"source": "paper, Figure 7 (CelebA)", "pairs": 50000,
            "rows": {k: dict(zip(ALPHAS, v)) for k, v in rows.items()}}


# Figure 7 (CelebA 128x128, 5 bits), one table per prior; rows are "embedding/decoder".
PAPER_CELEBA_FID = {
    "pixelcnn": _celeba({"activation/conv": (54.40, 55.75, 61.63, 89.38, 127.85),
                         "fisher/conv": (132.47, 131.85, 132.33, 133.76, 134.43),
                         "activation/realnvp": (22.29, 26.42, 34.41, 42.92, 46.99),
                         "fisher/realnvp": (30.27, 32.14, 35.53, 39.65, 41.83)}),
    "gated": _celeba({"activation/conv": (56.31, 56.92, 61.28, 77.38, 101.59),
                      "fisher/conv": (129.45, 128.99, 129.90, 132.50, 134.38),
                      "activation/realnvp": (24.42, 30.20, 41.76, 53.87, 59.00),
                      "fisher/realnvp": (33.46, 36.60, 41.74, 48.31, 52.17)}),
    "pyramid": _celeba({"activation/conv": (63.23, 63.38, 67.19, 74.98, 80.10),
                        "fisher/conv": (136.05, 130.70, 127.98, 127.62, 128.36),
                        "activation/realnvp": (24.52, 28.32, 36.81, 46.98, 51.75),
                        "fisher/realnvp": (31.16, 33.85, 37.30, 40.75, 42.38)}),
}


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
    """E[x̂] of every row of ``z`` (float (N, C, H, W) on the CPU, clamped to [0, 1]), decoder in eval mode."""
    decoder.eval()
    z = torch.as_tensor(z)
    out = [decode_mean(decoder(z[i:i + batch_size].to(device)), levels).clamp_(0, 1).cpu()
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


class FIDAccumulator:
    """Collects (task ids, features) batches in any order; each α's FID is computed once its N tasks are in.

    Features are stored in task order (float32, N × D per α still open), so the result does not depend
    on how tasks were batched or which worker ran them. Repeated task ids (a retried batch) count once.
    """

    def __init__(self, n_pairs: int, alphas, real: FIDStats):
        self.n, self.alphas, self.real = int(n_pairs), [float(a) for a in alphas], real
        self._feats: dict[int, np.ndarray] = {}
        self._seen = np.zeros((len(self.alphas), self.n), dtype=bool)
        self.fid: dict[float, float] = {}
        self.regularized: list[float] = []

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
                self.fid[alpha], reg = frechet(self._feats.pop(a), self.real)
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

    Returns {'id', and each of ``columns``: 'image' uint8 [N, H, W, C], 'label' [N] or 'attrs' [N, 40]}.
    """
    from fisher.data import decode_images
    from fisher.io import join, read_manifest, read_table
    manifest = read_manifest(data_dir, "prepare")
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
        if c == "image":
            out[c] = decode_images(table, manifest["image_shape"])
        elif c == "attrs":
            v = table[c].combine_chunks()
            out[c] = v.flatten().to_numpy().reshape(len(v), -1)
        else:
            out[c] = table[c].to_numpy()
    return out


# ---------------------------------------------------------------- tables and plots

def _alpha_key(a: float) -> str:
    return f"{float(a):g}"


def _as_paper(paper: dict | None) -> tuple[dict, str, int | None]:
    """(rows {label: {α: FID}}, source, pairs) of a paper constant or a plain {label: {α: FID}}."""
    if not paper:
        return {}, "paper", None
    if "rows" in paper:
        return paper["rows"], paper.get("source", "paper"), paper.get("pairs")
    return paper, "paper", None


def _fid_values(result: dict) -> dict[float, float | None]:
    return {float(k): (None if v is None else float(v)) for k, v in result["fid"].items()}


def fid_table(results: list[dict], paper: dict | None = None) -> str:
    """Markdown FID-vs-α table in the layout of paper Figure 3b / Figure 7.

    ``results`` are ``fid.json`` contents ({'label': 'fisher/conv', 'fid': {α: FID}, 'pairs': N, ...});
    rows are the labels (embedding/decoder), columns the α values, then N. ``paper`` (e.g.
    :data:`PAPER_MNIST_FID`, ``PAPER_CELEBA_FID['pixelcnn']`` or a plain {label: {α: FID}}) adds
    the paper's rows, marked with their source. Missing values are shown as "–". A result's
    ``real_floor`` ({'split', 'count', 'fid'}: N real images scored against the same statistics, the
    lowest FID that N can show) becomes one row with that value under every α.
    """
    rows_paper, source, paper_n = _as_paper(paper)
    values = [(r.get("label", "?"), _fid_values(r), r.get("pairs", r.get("n"))) for r in results]
    floors = {(f["split"], f["count"]): f["fid"] for r in results if (f := r.get("real_floor"))}
    values += [(f"real {split} images (floor at this N)", {a: v for a in _fid_values(results[0])}, n)
               for (split, n), v in floors.items()]
    values += [(f"{label} ({source})", {float(a): v for a, v in row.items()}, paper_n)
               for label, row in rows_paper.items()]
    alphas = sorted({a for _, row, _ in values for a in row})
    head = "| embedding / decoder | " + " | ".join(f"α = {_alpha_key(a)}" for a in alphas) + " | N pairs |"
    lines = [head, "|---" * (len(alphas) + 2) + "|"]
    for label, row, n in values:
        cells = ["–" if row.get(a) is None or not math.isfinite(row[a]) else f"{row[a]:.2f}" for a in alphas]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {n if n is not None else '–'} |")
    return "\n".join(lines)


def fid_plot(results: list[dict], paper: dict | None = None, title: str = "Interpolation FID") -> bytes:
    """PNG bytes: FID against α, one line per result (paper rows dashed)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    rows_paper, source, _ = _as_paper(paper)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    try:
        for r in results:
            row = sorted((a, v) for a, v in _fid_values(r).items() if v is not None and math.isfinite(v))
            if row:
                ax.plot(*zip(*row), marker="o", label=r.get("label", "?"))
        for label, row in rows_paper.items():
            pts = sorted((float(a), v) for a, v in row.items())
            ax.plot(*zip(*pts), linestyle="--", marker="x", alpha=0.7, label=f"{label} ({source})")
        alphas = {a for r in results for a in _fid_values(r)}
        alphas = sorted(alphas | {float(a) for row in rows_paper.values() for a in row})
        if alphas:
            ax.set_xticks(alphas)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xlabel("α (mixing coefficient)")
        ax.set_ylabel("FID")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
