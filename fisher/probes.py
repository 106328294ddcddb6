"""Semantic probes of an embedding space (beyond the paper).

Yan, Ho, Abbeel, sec. 5 claim that Fisher scores of an autoregressive model "hold semantic
information" (class structure on MNIST, attributes on CelebA), which is why interpolating and editing
in that space works. These probes test the claim directly on train/test embeddings:

* :func:`linear_probe`: closed-form ridge regression onto one-hot class targets (argmax) or onto 0/1
  attribute columns (threshold ½), on features standardized with the train statistics, the ridge
  fixed or chosen on a hold-out of the train rows (:func:`select_ridge`);
* :func:`knn_agreement`: how many of a test point's k nearest train neighbours (cosine similarity of
  standardized vectors) share its label;
* :func:`majority_baseline`: the accuracy of always predicting the most frequent train label.

Pure NumPy/SciPy; everything is computed in float64 except the kNN similarities (the inputs' float
precision, at least float32), and memory beyond the inputs is bounded by chunking: an embedding of
16384 dimensions is never copied whole.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from fisher.io import FisherError

CHUNK = 2048   # rows (or columns) standardized at a time


# ---------------------------------------------------------------- inputs

def _embeddings(z_train, z_test) -> tuple[np.ndarray, np.ndarray]:
    z_train, z_test = np.asarray(z_train), np.asarray(z_test)
    for what, z in (("z_train", z_train), ("z_test", z_test)):
        if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
            raise FisherError(f"probe {what}: need a non-empty (N, dim) embedding array, got shape {z.shape}")
        if not np.issubdtype(z.dtype, np.number) or not all(np.isfinite(z[r:r + CHUNK]).all()
                                                             for r in range(0, len(z), CHUNK)):
            raise FisherError(f"probe {what}: embeddings must be finite numbers; recompute them")
    if z_train.shape[1] != z_test.shape[1]:
        raise FisherError(f"probe: z_train has {z_train.shape[1]} dimensions, z_test {z_test.shape[1]}")
    return z_train, z_test


def _labels(y, n: int, what: str) -> np.ndarray:
    """Class labels (N,) or 0/1 attribute columns (N, A), checked against the N embedding rows."""
    y = np.asarray(y)
    if y.ndim not in (1, 2) or y.shape[0] != n or (y.ndim == 2 and y.shape[1] == 0):
        raise FisherError(f"probe {what}: need labels (N,) or 0/1 attribute columns (N, A) for the {n} "
                          f"embedding rows, got shape {y.shape}")
    if y.ndim == 2 and not np.isin(y, (0, 1)).all():
        raise FisherError(f"probe {what}: attribute columns must hold 0/1 values")
    return y


def _both_labels(y_train, y_test, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    y_train, y_test = _labels(y_train, n_train, "y_train"), _labels(y_test, n_test, "y_test")
    if y_train.shape[1:] != y_test.shape[1:]:
        raise FisherError(f"probe: y_train {y_train.shape} and y_test {y_test.shape} differ in label layout")
    return y_train, y_test


def standardizer(z_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate train mean and std (float64; constant coordinates get std 1, so they become 0)."""
    mean = np.zeros(z_train.shape[1])
    sq = np.zeros(z_train.shape[1])
    for start in range(0, len(z_train), CHUNK):       # two-pass: exact mean, then the squared deviations
        mean += z_train[start:start + CHUNK].sum(0, dtype=np.float64)
    mean /= len(z_train)
    for start in range(0, len(z_train), CHUNK):
        sq += ((z_train[start:start + CHUNK] - mean) ** 2).sum(0)
    std = np.sqrt(sq / len(z_train))
    return mean, np.where(std > 0, std, 1.0)


def _scores(y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Regression targets: one-hot over the train classes (multi-class) or the 0/1 columns (multi-label)."""
    if y.ndim == 2:
        return y.astype(np.float64), None
    classes, index = np.unique(y, return_inverse=True)
    return np.eye(len(classes))[index], classes


# ---------------------------------------------------------------- linear probe

def _gram(a: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """S(a) S(b)ᵀ for S(z) = (z - mean) / std, accumulated over column chunks (float64)."""
    out = np.zeros((len(a), len(b)))
    for c in range(0, a.shape[1], CHUNK):
        cols = slice(c, c + CHUNK)
        sa = (a[:, cols] - mean[cols]) / std[cols]
        sb = sa if b is a else (b[:, cols] - mean[cols]) / std[cols]
        out += sa @ sb.T
    return out


def ridge_predict(z_train, targets: np.ndarray, z_test, ridge: float = 1e-3,
                  solver: str = "auto") -> tuple[np.ndarray, str]:
    """Ridge regression predictions for ``z_test``: minimizes ‖X W + 1bᵀ - T‖²/n + ridge·‖W‖² over W and
    an unpenalized intercept b, X the train embeddings standardized with their own statistics.

    ``solver``: "primal" solves (XᵀX + n·ridge·I) W = Xᵀ(T - T̄) (a d × d system); "dual" solves
    (XXᵀ + n·ridge·I) A = T - T̄ and predicts X_test Xᵀ A (an n × n system, the kernel form); the two
    give the same predictions. "auto" picks dual when n < d (memory n² + n_test·n floats), else primal
    (memory d² floats). Returns (predictions [n_test, targets], solver).
    """
    z_train, z_test = _embeddings(z_train, z_test)
    return _ridge(z_train, np.asarray(targets, dtype=np.float64), z_test, ridge, solver)


def _ridge(z_train: np.ndarray, targets: np.ndarray, z_test: np.ndarray, ridge: float,
           solver: str) -> tuple[np.ndarray, str]:
    n, d = z_train.shape
    if targets.ndim != 2 or len(targets) != n:
        raise FisherError(f"ridge: need targets (N, T) for the {n} train rows, got shape {targets.shape}")
    if not ridge > 0:
        raise FisherError(f"linear probe: ridge must be > 0, got {ridge}")
    if solver not in ("auto", "primal", "dual"):
        raise FisherError(f"linear probe: solver must be 'auto', 'primal' or 'dual', got {solver!r}")
    solver = ("dual" if n < d else "primal") if solver == "auto" else solver
    mean, std = standardizer(z_train)
    t_mean = targets.mean(0)
    t = targets - t_mean
    if solver == "dual":
        k = _gram(z_train, z_train, mean, std)
        k[np.diag_indices_from(k)] += n * ridge
        alpha = scipy.linalg.solve(k, t, assume_a="pos")
        return _gram(z_test, z_train, mean, std) @ alpha + t_mean, solver
    xtx, xtt = np.zeros((d, d)), np.zeros((d, t.shape[1]))
    for r in range(0, n, CHUNK):
        x = (z_train[r:r + CHUNK] - mean) / std
        xtx += x.T @ x
        xtt += x.T @ t[r:r + CHUNK]
    xtx[np.diag_indices_from(xtx)] += n * ridge
    w = scipy.linalg.solve(xtx, xtt, assume_a="pos")
    pred = np.concatenate([((z_test[r:r + CHUNK] - mean) / std) @ w for r in range(0, len(z_test), CHUNK)])
    return pred + t_mean, solver


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)    # candidates of ridge="auto"
HOLDOUT = 0.2                                            # share of the train rows that scores them


def select_ridge(z_train, y_train, grid=RIDGE_GRID, holdout: float = HOLDOUT, seed: int = 0,
                 solver: str = "auto") -> dict:
    """The ridge of ``grid`` whose probe, fitted on a seeded (1 - ``holdout``) share of the train rows, is the
    most accurate on the rest (ties: the larger ridge). The test split is never looked at.
    Returns {ridge, holdout_accuracy: {ridge: accuracy}, n_fit, n_holdout}."""
    z_train = np.asarray(z_train)
    y_train = _labels(y_train, len(z_train), "y_train")
    n_hold = int(round(len(z_train) * holdout))
    if not 0 < n_hold < len(z_train) - 1:
        raise FisherError(f"probe: {len(z_train)} train rows are too few to choose the ridge on a "
                          f"{holdout:.0%} hold-out; pass a fixed ridge")
    order = np.random.default_rng(seed).permutation(len(z_train))
    fit, hold = np.sort(order[n_hold:]), np.sort(order[:n_hold])
    scores = {float(r): linear_probe(z_train[fit], y_train[fit], z_train[hold], y_train[hold], ridge=r,
                                     solver=solver)["accuracy"] for r in grid}
    best = max(scores, key=lambda r: (scores[r], r))
    return {"ridge": best, "holdout_accuracy": scores, "n_fit": len(fit), "n_holdout": len(hold)}


def linear_probe(z_train, y_train, z_test, y_test, ridge: float | str = 1e-3, solver: str = "auto") -> dict:
    """Test accuracy of a closed-form ridge-regression probe (see :func:`ridge_predict` for the objective).

    ``y`` of shape (N,): class labels; the probe regresses one-hot targets over the train classes and
    predicts the argmax (a test label absent from train counts as wrong). ``y`` of shape (N, A) with 0/1
    values: A binary attributes (e.g. CelebA's 40); each column is regressed on its own and predicted 1
    where the fit exceeds ½; ``per_column`` holds the A accuracies and ``accuracy`` their mean.
    ``ridge="auto"`` chooses it on a hold-out of the train rows (:func:`select_ridge`, recorded as
    ``ridge_selection``) and then fits on all of them.
    Returns {accuracy, per_column (multi-label only), solver, ridge, n_train, n_test, dim}.
    """
    z_train, z_test = _embeddings(z_train, z_test)
    if ridge == "auto":
        selection = select_ridge(z_train, y_train, solver=solver)
        return {**linear_probe(z_train, y_train, z_test, y_test, selection["ridge"], solver),
                "ridge_selection": selection}
    y_train, y_test = _both_labels(y_train, y_test, len(z_train), len(z_test))
    targets, classes = _scores(y_train)
    pred, used = _ridge(z_train, targets, z_test, ridge, solver)
    out = {"solver": used, "ridge": float(ridge), "n_train": len(z_train), "n_test": len(z_test),
           "dim": int(z_train.shape[1])}
    if classes is None:
        per_column = ((pred > 0.5) == (y_test == 1)).mean(0)
        return {"accuracy": float(per_column.mean()), "per_column": per_column.tolist(), **out}
    return {"accuracy": float((classes[pred.argmax(1)] == y_test).mean()), **out}


# ---------------------------------------------------------------- k nearest neighbours

def _unit_rows(z: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype) -> np.ndarray:
    """Standardized rows scaled to unit length (all-zero rows stay zero)."""
    s = ((z - mean) / std).astype(dtype)
    norm = np.linalg.norm(s, axis=1, keepdims=True)
    return s / np.where(norm > 0, norm, 1)


def nearest_neighbours(z_train, z_test, k: int = 10) -> np.ndarray:
    """int64 [n_test, k]: indices of each test row's k most cosine-similar train rows (most similar first),
    both standardized with the train statistics. Chunked over test and train rows (a running top k), so
    memory beyond the inputs stays O(chunk × (chunk + k)) whatever the sizes (10k × 60k included)."""
    z_train, z_test = _embeddings(z_train, z_test)
    return _neighbours(z_train, z_test, k)


def _neighbours(z_train: np.ndarray, z_test: np.ndarray, k: int) -> np.ndarray:
    if not 1 <= k <= len(z_train):
        raise FisherError(f"kNN: k = {k} must be between 1 and the {len(z_train)} train rows")
    mean, std = standardizer(z_train)
    dtype = np.result_type(z_train.dtype, z_test.dtype, np.float32)
    out = np.empty((len(z_test), k), np.int64)
    for t in range(0, len(z_test), CHUNK):
        q = _unit_rows(z_test[t:t + CHUNK], mean, std, dtype)
        best_sim, best_idx = np.empty((len(q), 0), dtype), np.empty((len(q), 0), np.int64)
        for r in range(0, len(z_train), CHUNK):
            chunk = _unit_rows(z_train[r:r + CHUNK], mean, std, dtype)
            sim = np.concatenate([best_sim, q @ chunk.T], axis=1)
            idx = np.concatenate([best_idx, np.broadcast_to(np.arange(r, r + len(chunk)), (len(q), len(chunk)))], 1)
            if sim.shape[1] > k:
                keep = np.argpartition(-sim, k - 1, axis=1)[:, :k]
                sim, idx = np.take_along_axis(sim, keep, 1), np.take_along_axis(idx, keep, 1)
            best_sim, best_idx = sim, idx
        order = np.argsort(-best_sim, axis=1, kind="stable")
        out[t:t + CHUNK] = np.take_along_axis(best_idx, order, 1)
    return out


def knn_agreement(z_train, y_train, z_test, y_test, k: int = 10) -> float:
    """Mean over test points of the fraction of their k nearest train neighbours (cosine similarity of
    standardized vectors, :func:`nearest_neighbours`) whose label equals theirs. For 0/1 attribute columns
    (N, A): the same per column, averaged over the A columns. Random neighbours would give Σ_c p_c²."""
    z_train, z_test = _embeddings(z_train, z_test)
    y_train, y_test = _both_labels(y_train, y_test, len(z_train), len(z_test))
    neighbours = _neighbours(z_train, z_test, k)
    return float((y_train[neighbours] == y_test[:, None]).mean())


def majority_baseline(y_train, y_test) -> dict:
    """Accuracy on ``y_test`` of always predicting the most frequent ``y_train`` label (ties: the smallest
    label); for 0/1 attribute columns, per column (ties: 0), with ``accuracy`` the mean over columns.
    Returns {accuracy, prediction, per_column (multi-label only)}."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if y_train.size == 0 or y_test.size == 0:
        raise FisherError(f"majority baseline: empty labels (train {y_train.shape}, test {y_test.shape})")
    y_train, y_test = _both_labels(y_train, y_test, len(y_train), len(y_test))
    if y_train.ndim == 2:
        prediction = (y_train.mean(0) > 0.5).astype(np.int64)
        per_column = (y_test == prediction).mean(0)
        return {"accuracy": float(per_column.mean()), "prediction": prediction.tolist(),
                "per_column": per_column.tolist()}
    classes, counts = np.unique(y_train, return_counts=True)
    prediction = classes[counts.argmax()]
    return {"accuracy": float((y_test == prediction).mean()), "prediction": prediction.item()}
