"""Semantic probes (beyond the paper; tests the sec. 5 claim that Fisher scores hold semantic information):
ridge linear probe, kNN label agreement, majority baseline."""
import numpy as np
import pytest

from fisher import probes
from fisher.io import FisherError


def _clusters(n_per: int, centres: np.ndarray, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(centres)), n_per)
    return centres[y] + spread * rng.normal(size=(len(y), centres.shape[1])), y


@pytest.mark.parametrize("dim, n_per, solver", [(20, 50, "primal"), (400, 10, "dual")])
def test_separable_classes_and_attributes_give_accuracy_one(dim, n_per, solver):
    centres = 5 * np.random.default_rng(0).normal(size=(4, dim))
    z_train, y_train = _clusters(n_per, centres, 0.1, seed=1)
    z_test, y_test = _clusters(n_per, centres, 0.1, seed=2)
    out = probes.linear_probe(z_train, y_train, z_test, y_test)
    assert out["accuracy"] == 1.0 and out["solver"] == solver and "per_column" not in out
    assert (out["n_train"], out["n_test"], out["dim"]) == (4 * n_per, 4 * n_per, dim)
    bits = lambda y: np.stack([y & 1, y >> 1], axis=1)          # two attributes: the cluster's binary code
    multi = probes.linear_probe(z_train, bits(y_train), z_test, bits(y_test))
    assert multi["accuracy"] == 1.0 and multi["per_column"] == [1.0, 1.0]
    assert probes.knn_agreement(z_train, y_train, z_test, y_test, k=5) == 1.0


def test_random_labels_give_chance():
    rng = np.random.default_rng(3)
    z_train, z_test = rng.normal(size=(2000, 10)), rng.normal(size=(2000, 10))
    y_train, y_test = rng.integers(0, 4, 2000), rng.integers(0, 4, 2000)
    accuracy = probes.linear_probe(z_train, y_train, z_test, y_test)["accuracy"]
    assert accuracy == pytest.approx(0.25, abs=0.04)
    assert probes.knn_agreement(z_train, y_train, z_test, y_test, k=10) == pytest.approx(0.25, abs=0.03)
    attrs_train, attrs_test = rng.integers(0, 2, (2000, 3)), rng.integers(0, 2, (2000, 3))
    multi = probes.linear_probe(z_train, attrs_train, z_test, attrs_test)
    assert np.allclose(multi["per_column"], 0.5, atol=0.05)


def test_ridge_by_hand():
    # standardized train x = [-1, 1], one-hot T = I, T - T̄ = ±½; W = Xᵀ(T - T̄)/(XᵀX + n·ridge) = [-1, 1]/(2 + 1)
    z_train, targets, z_test = np.array([[-1.0], [1.0]]), np.eye(2), np.array([[0.3], [-0.6]])
    for solver in ("primal", "dual"):
        pred, used = probes.ridge_predict(z_train, targets, z_test, ridge=0.5, solver=solver)
        assert used == solver and np.allclose(pred, [[0.4, 0.6], [0.7, 0.3]], atol=1e-12)
    out = probes.linear_probe(z_train * 3 + 7, [4, 9], z_test * 3 + 7, [9, 4], ridge=0.5)   # labels via classes
    assert out["accuracy"] == 1.0


def test_knn_by_hand():
    # standardization scales both coordinates alike here, so these are plain cosines
    z_train = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y_train, z_test, y_test = np.array([0, 0, 1, 1]), np.array([[2.0, 0.5], [0.1, -3.0]]), np.array([0, 1])
    assert probes.nearest_neighbours(z_train, z_test, k=3).tolist() == [[0, 2, 3], [3, 0, 1]]
    assert probes.knn_agreement(z_train, y_train, z_test, y_test, k=1) == 1.0
    assert probes.knn_agreement(z_train, y_train, z_test, y_test, k=2) == 0.5
    assert probes.knn_agreement(z_train, y_train, z_test, y_test, k=3) == pytest.approx(1 / 3)


def test_majority_by_hand():
    assert probes.majority_baseline([1, 1, 2, 3, 3], [1, 2, 2, 1, 1]) == {"accuracy": 0.6, "prediction": 1}
    out = probes.majority_baseline([[1, 0], [1, 1], [0, 1], [1, 0]], [[1, 1], [0, 0]])
    assert out["prediction"] == [1, 0] and out["per_column"] == [0.5, 0.5] and out["accuracy"] == 0.5


def test_multilabel_shapes():
    rng = np.random.default_rng(4)
    z_train, z_test = rng.normal(size=(60, 5)), rng.normal(size=(30, 5))
    a_train, a_test = rng.integers(0, 2, (60, 7)), rng.integers(0, 2, (30, 7))
    out = probes.linear_probe(z_train, a_train, z_test, a_test)
    assert len(out["per_column"]) == 7 and out["accuracy"] == pytest.approx(np.mean(out["per_column"]))
    single = [probes.linear_probe(z_train, a_train[:, j], z_test, a_test[:, j])["accuracy"] for j in range(7)]
    assert np.allclose(out["per_column"], single)      # each column is its own regression
    per_col_knn = [probes.knn_agreement(z_train, a_train[:, j], z_test, a_test[:, j], k=4) for j in range(7)]
    assert probes.knn_agreement(z_train, a_train, z_test, a_test, k=4) == pytest.approx(np.mean(per_col_knn))
    with pytest.raises(FisherError, match="label layout"):
        probes.linear_probe(z_train, a_train, z_test, a_test[:, :3])
    with pytest.raises(FisherError, match="label layout"):
        probes.knn_agreement(z_train, a_train[:, 0], z_test, a_test, k=3)
    with pytest.raises(FisherError, match="0/1"):
        probes.linear_probe(z_train, a_train * 2, z_test, a_test)


def test_knn_invariant_to_per_coordinate_affine_rescaling(monkeypatch):
    rng = np.random.default_rng(5)
    z_train, z_test = rng.normal(size=(300, 6)), rng.normal(size=(50, 6))
    y_train, y_test = (z_train[:, 0] > 0).astype(int), (z_test[:, 0] > 0).astype(int)
    scale, shift = np.array([3.0, -0.2, 10.0, 1e-3, -7.0, 1.0]), rng.normal(size=6) * 100
    before = probes.nearest_neighbours(z_train, z_test, k=8)
    after = probes.nearest_neighbours(z_train * scale + shift, z_test * scale + shift, k=8)
    assert (before == after).all()
    assert probes.knn_agreement(z_train, y_train, z_test, y_test, 8) == \
        probes.knn_agreement(z_train * scale + shift, y_train, z_test * scale + shift, y_test, 8)
    # without standardization, cosine neighbours do change under such a rescaling
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)
    raw = np.argsort(-(unit(z_test * scale + shift) @ unit(z_train * scale + shift).T), axis=1)[:, :8]
    assert (raw != before).any()


def test_chunked_neighbours_equal_brute_force(monkeypatch):
    rng = np.random.default_rng(6)
    z_train, z_test = rng.normal(size=(103, 4)) * [1, 2, 3, 4] + 1, rng.normal(size=(29, 4))
    mean, std = z_train.mean(0), z_train.std(0)
    unit = lambda z: ((z - mean) / std) / np.linalg.norm((z - mean) / std, axis=1, keepdims=True)
    brute = np.argsort(-(unit(z_test) @ unit(z_train).T), axis=1)[:, :9]
    monkeypatch.setattr(probes, "CHUNK", 7)
    assert (probes.nearest_neighbours(z_train, z_test, k=9) == brute).all()
    assert (probes.nearest_neighbours(z_train.astype(np.float32), z_test, k=9)[:, 0] == brute[:, 0]).all()


@pytest.mark.parametrize("n, dim", [(40, 60), (80, 30)])
def test_dual_and_primal_ridge_agree(n, dim, monkeypatch):
    rng = np.random.default_rng(7)
    z_train, z_test = rng.normal(size=(n, dim)) * rng.uniform(0.5, 3, dim), rng.normal(size=(25, dim))
    targets = rng.normal(size=(n, 3))
    x = (z_train - z_train.mean(0)) / z_train.std(0)
    w = np.linalg.solve(x.T @ x + n * 1e-2 * np.eye(dim), x.T @ (targets - targets.mean(0)))
    direct = ((z_test - z_train.mean(0)) / z_train.std(0)) @ w + targets.mean(0)
    monkeypatch.setattr(probes, "CHUNK", 16)             # exercise the chunked Gram / normal equations
    primal, _ = probes.ridge_predict(z_train, targets, z_test, ridge=1e-2, solver="primal")
    dual, _ = probes.ridge_predict(z_train, targets, z_test, ridge=1e-2, solver="dual")
    assert np.allclose(primal, direct, atol=1e-9) and np.allclose(dual, direct, atol=1e-9)


def test_wide_embeddings_use_the_dual():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(120, 16384)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    out = probes.linear_probe(z[:80], y[:80], z[80:], y[80:])
    assert out["solver"] == "dual" and 0 <= out["accuracy"] <= 1


def test_constant_coordinates_are_harmless():
    z_train = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    out = probes.linear_probe(z_train, [0, 0, 1, 1], np.array([[0.2, 5.0], [2.8, 5.0]]), [0, 1])
    assert out["accuracy"] == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: probes.linear_probe(np.zeros((0, 3)), [], np.zeros((2, 3)), [0, 1]), "non-empty"),
    (lambda: probes.linear_probe(np.zeros((4, 3)), [0, 1, 0, 1], np.zeros((2, 2)), [0, 1]), "dimensions"),
    (lambda: probes.linear_probe(np.zeros((4, 3)), [0, 1, 0], np.zeros((2, 3)), [0, 1]), "4 embedding rows"),
    (lambda: probes.linear_probe(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [0, 1], ridge=0), "ridge"),
    (lambda: probes.linear_probe(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [0, 1], solver="x"), "solver"),
    (lambda: probes.knn_agreement(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [0, 1], k=5), "k = 5"),
    (lambda: probes.knn_agreement(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [0, 1], k=0), "k = 0"),
    (lambda: probes.knn_agreement(np.full((4, 3), np.nan), [0] * 4, np.ones((2, 3)), [0, 1]), "finite"),
    (lambda: probes.majority_baseline([], [1]), "empty"),
])
def test_bad_input(call, match):
    with pytest.raises(FisherError, match=match):
        call()


def test_ridge_selection_uses_only_the_train_split():
    from fisher.probes import RIDGE_GRID, linear_probe, select_ridge
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=300)
    z = np.concatenate([np.eye(3)[y] + 0.8 * rng.standard_normal((300, 3)), rng.standard_normal((300, 400))], 1)
    sel = select_ridge(z[:200], y[:200])
    assert sel["ridge"] in RIDGE_GRID and sel["n_fit"] + sel["n_holdout"] == 200
    assert sel["holdout_accuracy"][sel["ridge"]] == max(sel["holdout_accuracy"].values())
    auto = linear_probe(z[:200], y[:200], z[200:], y[200:], ridge="auto")
    fixed = linear_probe(z[:200], y[:200], z[200:], y[200:], ridge=sel["ridge"])
    assert auto["accuracy"] == fixed["accuracy"] and auto["ridge"] == sel["ridge"]
    shuffled = linear_probe(z[:200], y[:200], z[200:], rng.permutation(y[200:]), ridge="auto")
    assert shuffled["ridge"] == auto["ridge"]                  # the test labels never choose the ridge
    # 400 noise dimensions on 160 fitting rows: the tiniest ridge interpolates the noise and loses
    assert sel["ridge"] > RIDGE_GRID[0]
    assert auto["accuracy"] > linear_probe(z[:200], y[:200], z[200:], y[200:], ridge=RIDGE_GRID[0])["accuracy"]
