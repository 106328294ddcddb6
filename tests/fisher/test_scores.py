"""Exact per-image Fisher scores against a one-backward-per-image reference."""
import pytest
import torch

from fisher.models import PixelCNN
from fisher.projection import ProjectionStack, SparseProjection
from fisher.scores import (
    activations,
    fisher_scores,
    fisher_scores_reference,
    fisher_scores_vmap,
    free_masks,
    n_features,
)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def binary_model():
    torch.manual_seed(0)
    return PixelCNN(n_layers=3, filters=8, kernel_size=5).eval()


@pytest.fixture(scope="module")
def rgb_model():
    torch.manual_seed(1)
    return PixelCNN(channels=3, levels=32, n_layers=2, filters=9).eval()


def test_n_features_counts_only_free_weights(binary_model):
    m = binary_model
    total = sum(p.numel() for p in m.parameters())
    pinned = sum(int((mod.mask == 0).sum()) for mod in [*m.hidden_layers, m.output])
    assert n_features(m) == total - pinned
    # kernel 5, mask A: 12 free taps; mask B: 13 free taps
    assert int(m.hidden_layers[0].mask[0, 0].sum()) == 12 and int(m.hidden_layers[1].mask[0, 0].sum()) == 13


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_binary_matches_reference(binary_model, chunk):
    x = torch.randint(0, 2, (6, 1, 12, 12))
    ref = fisher_scores_reference(binary_model, x)
    assert rel_err(fisher_scores(binary_model, x, chunk_size=chunk), ref) <= 1e-5


def test_rgb_channel_masks_match_reference(rgb_model):
    x = torch.randint(0, 32, (4, 3, 8, 8))
    ref = fisher_scores_reference(rgb_model, x)
    assert rel_err(fisher_scores(rgb_model, x), ref) <= 1e-5
    assert rel_err(fisher_scores_vmap(rgb_model, x), ref) <= 1e-5


def test_pinned_weights_have_zero_gradient(binary_model):
    """The excluded entries really are pinned: their full gradient is exactly zero."""
    x = torch.randint(0, 2, (2, 1, 12, 12))
    masks = free_masks(binary_model)
    grads = torch.autograd.grad(binary_model.log_prob(x).sum(), list(binary_model.parameters()))
    for (name, _), g in zip(binary_model.named_parameters(), grads):
        assert torch.all(g[~masks[name]] == 0), name


def test_score_is_gradient_of_log_prob_not_nll(binary_model):
    x = torch.randint(0, 2, (1, 1, 12, 12))
    g = fisher_scores(binary_model, x)[0]
    bias = binary_model.output.bias
    eps = 1e-3
    with torch.no_grad():
        bias += eps
        up = binary_model.log_prob(x)
        bias -= 2 * eps
        down = binary_model.log_prob(x)
        bias += eps
    assert float(g[-1]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-2)


def test_projected_scores_equal_projection_of_scores(binary_model):
    x = torch.randint(0, 2, (5, 1, 12, 12))
    n = n_features(binary_model)
    projs = [SparseProjection(n, 64, None, seed=0), SparseProjection(n, 32, 1.0, seed=0)]
    g = fisher_scores(binary_model, x)
    zs = fisher_scores(binary_model, x, projs)
    for z, p in zip(zs, projs):
        assert torch.allclose(z, g @ p.dense().t(), rtol=1e-4, atol=1e-4)
    assert torch.equal(fisher_scores(binary_model, x, projs[0]), zs[0])


def test_embedding_independent_of_batch_size(binary_model):
    x = torch.randint(0, 2, (11, 1, 12, 12))
    p = SparseProjection(n_features(binary_model), 48, seed=2)
    full = fisher_scores(binary_model, x, p, chunk_size=16)
    for rows in (slice(3, 7), slice(10, 11), slice(0, 11)):
        assert torch.equal(fisher_scores(binary_model, x[rows], p, chunk_size=16), full[rows])
    halves = torch.cat([fisher_scores(binary_model, x[:5], p, chunk_size=16),
                        fisher_scores(binary_model, x[5:], p, chunk_size=16)])
    assert torch.equal(halves, full)


def test_activations_are_last_hidden_layer(binary_model):
    x = torch.randint(0, 2, (3, 1, 12, 12))
    a = activations(binary_model, x)
    assert a.shape == (3, 8 * 12 * 12)
    assert torch.all(a >= 0)                              # after ReLU


def test_embedding_independent_of_memory_layout(binary_model):
    """A 1-channel NHWC→NCHW permute keeps channels-last strides; scores must not change."""
    x = torch.randint(0, 2, (20, 1, 12, 12))
    odd = torch.from_numpy(x.numpy().transpose(0, 2, 3, 1).copy()).permute(0, 3, 1, 2)
    assert odd.stride() != x.stride()
    p = SparseProjection(n_features(binary_model), 32, seed=0)
    assert torch.equal(fisher_scores(binary_model, odd, p, chunk_size=16), fisher_scores(binary_model, x, p, chunk_size=16))


def test_chunks_projected_together_give_each_images_bits(binary_model, monkeypatch):
    """On the CPU a batch's chunks are projected together (each non-zero and each expanded dense block applied
    to all of them in one pass): every image keeps the bits it gets alone, for sparse members walked by rows
    and by columns and for dense ones."""
    import fisher.scores as scores
    n = n_features(binary_model)
    projs = [SparseProjection(n, 48, seed=2), SparseProjection(n, 4096, 0.05, seed=3), SparseProjection(n, 40, 1.0, seed=4)]
    x = torch.randint(0, 2, (37, 1, 12, 12))
    grouped = fisher_scores(binary_model, x, ProjectionStack(projs), chunk_size=16)
    assert scores._chunks_per_group(None, x, 16, n) == 1 and scores._chunks_per_group(ProjectionStack(projs), x, 16, n) == 3
    assert scores._chunks_per_group(ProjectionStack(projs[:2]), x, 16, n) == 1        # sparse only: one chunk's memory
    monkeypatch.setattr(scores, "GROUP_BYTES", 1)                          # one chunk at a time
    alone = fisher_scores(binary_model, x, projs, chunk_size=16)
    each = [torch.cat([fisher_scores(binary_model, x[i:i + 1], p, chunk_size=16) for i in range(37)]) for p in projs]
    for g, a, e in zip(grouped, alone, each):
        assert torch.equal(g.view(torch.int32), a.view(torch.int32))
        assert torch.equal(g.view(torch.int32), e.view(torch.int32))


def test_chunks_whose_blocks_differ_are_projected_one_by_one(binary_model, monkeypatch):
    """If a later chunk's blocks come in another order (a layer leaving its rule mid-batch), the group falls
    back to one chunk at a time: the same scores, up to the summation order."""
    import fisher.scores as scores
    n = n_features(binary_model)
    stack = ProjectionStack([SparseProjection(n, 48, seed=2), SparseProjection(n, 40, 1.0, seed=4)])
    x = torch.randint(0, 2, (40, 1, 12, 12))
    want = fisher_scores(binary_model, x, stack, chunk_size=16)
    real, calls = scores._blocks, []

    def shuffled(model, plan, xc):
        calls.append(1)
        blocks = list(real(model, plan, xc))
        return blocks[::-1] if len(calls) % 3 == 2 else blocks
    monkeypatch.setattr(scores, "_blocks", shuffled)
    got = fisher_scores(binary_model, x, stack, chunk_size=16)
    assert len(calls) == 3
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6) and not torch.equal(g, w)


def test_runs_join_adjacent_narrow_blocks(binary_model, monkeypatch):
    """Adjacent blocks narrower than the run width are joined until a run reaches it; a gap in the features or
    a block at least that wide ends a run, and a wide block goes alone, uncopied. Whatever the width, the
    projected scores stay batch-size invariant, grouped chunks keep each image's bits, and the embedding is the
    projection of the scores."""
    import fisher.scores as scores
    g = {k: torch.randn(2, w) for k, w in (("a", 3), ("b", 4), ("c", 9), ("d", 2), ("e", 1), ("f", 5))}
    seq = [(0, g["a"]), (3, g["b"]), (7, g["c"]), (16, g["d"]), (20, g["e"]), (21, g["f"])]   # a gap before 20
    runs = list(scores._runs(iter(seq), width=6))
    assert [(o, b.shape[1]) for o, b in runs] == [(0, 7), (7, 9), (16, 2), (20, 6)]
    assert runs[1][1] is g["c"]
    assert torch.equal(runs[0][1], torch.cat([g["a"], g["b"]], 1))
    assert torch.equal(runs[3][1], torch.cat([g["e"], g["f"]], 1))
    n = n_features(binary_model)
    projs = [SparseProjection(n, 48, seed=2), SparseProjection(n, 40, 1.0, seed=4)]
    x = torch.randint(0, 2, (37, 1, 12, 12))
    g_all = fisher_scores(binary_model, x)
    for width in (50, 700, 1 << 16):
        monkeypatch.setattr(scores, "RUN_FEATURES", width)
        full = fisher_scores(binary_model, x, projs, chunk_size=16)
        alone = fisher_scores(binary_model, x[5:9], projs, chunk_size=16)
        for z, a, p in zip(full, alone, projs):
            assert torch.equal(z[5:9].view(torch.int32), a.view(torch.int32))
            assert torch.allclose(z, g_all @ p.dense().t(), rtol=1e-4, atol=1e-4)


def test_default_chunk_by_prior_size(binary_model, monkeypatch):
    """Without a chunk size, a prior of up to SMALL_PRIOR_FEATURES features is run 64 images per gradient pass
    and a larger one 32."""
    import fisher.scores as scores
    n = n_features(binary_model)
    p = SparseProjection(n, 48, seed=2)
    x = torch.randint(0, 2, (70, 1, 12, 12))
    real, sizes = scores._blocks, []
    monkeypatch.setattr(scores, "_blocks", lambda model, plan, xc: sizes.append(xc.shape[0]) or real(model, plan, xc))
    want = fisher_scores(binary_model, x, p, chunk_size=64)
    sizes.clear()
    assert torch.equal(fisher_scores(binary_model, x, p), want) and sizes == [64, 64]
    monkeypatch.setattr(scores, "SMALL_PRIOR_FEATURES", n - 1)
    assert scores.default_chunk(n) == 32 and scores.default_chunk(n - 1) == 64
    sizes.clear()
    fisher_scores(binary_model, x, p)
    assert sizes == [32, 32, 32]


def test_chunk_size_below_one_is_refused(binary_model):
    with pytest.raises(ValueError, match="chunk_size=0: must be >= 1"):
        fisher_scores(binary_model, torch.zeros(2, 1, 12, 12), chunk_size=0)


def test_gpu_projection_path_gives_the_cpu_embeddings(binary_model, monkeypatch):
    """fisher_scores on the products a GPU runs (forced on CPU tensors): the CPU's embeddings, round-off
    aside, for a stack with sparse and density-1 members."""
    n = n_features(binary_model)
    projs = [SparseProjection(n, 48, seed=2), SparseProjection(n, 40, 1.0, seed=4)]
    x = torch.randint(0, 2, (37, 1, 12, 12))
    want = fisher_scores(binary_model, x, ProjectionStack(projs), chunk_size=16)
    monkeypatch.setattr(ProjectionStack, "uses_cpu_kernels", staticmethod(lambda t: False))
    import fisher.scores as scores
    stack = ProjectionStack(projs)
    assert scores._chunks_per_group(stack, x, 16, n) == 1
    got = fisher_scores(binary_model, x, stack, chunk_size=16)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
