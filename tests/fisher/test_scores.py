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
    score_plan,
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


def test_runs_are_joined_in_the_layout_most_of_their_features_have():
    """A run of blocks stored both ways (features-major, as the per-offset conv blocks come for a projection,
    and images-major) is joined in the layout most of its features have, each block copied or transposed
    into place; the values are those of the blocks side by side."""
    import fisher.scores as scores
    gen = torch.Generator().manual_seed(1)
    rm = {w: torch.randn(16, w, generator=gen) for w in (1, 3, 4, 5, 70)}
    fm = {w: torch.randn(w, 16, generator=gen).t() for w in (1, 3, 4, 5, 70)}
    for pieces, features_major in (([fm[3], rm[4]], False), ([fm[5], rm[1]], True), ([rm[3], fm[70], rm[5]], True),
                                   ([rm[70], fm[5], fm[1], rm[4]], False)):
        seq, at = [], 0
        for g in pieces:
            seq.append((at, g))
            at += g.shape[1]
        (offset, run), = scores._runs(iter(seq), width=1000)
        assert offset == 0 and torch.equal(run, torch.cat(pieces, 1))
        assert scores._features_major(run) == features_major and (run.is_contiguous() or run.t().is_contiguous())
    assert all(scores._features_major(g) for g in fm.values() if g.shape[1] > 1)


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


def test_plan_is_built_once_per_model_and_again_when_it_changes(monkeypatch):
    """fisher_scores builds a model's plan once; a mask changed in place, a replaced parameter or another
    method threshold builds it again, and the scores follow the change."""
    import fisher.scores as scores
    torch.manual_seed(3)
    model = PixelCNN(n_layers=2, filters=4, kernel_size=3).eval()
    x = torch.randint(0, 2, (3, 1, 8, 8))
    builds = []
    real = scores._make_plan
    monkeypatch.setattr(scores, "_make_plan", lambda m: builds.append(1) or real(m))
    first = fisher_scores(model, x)
    assert torch.equal(fisher_scores(model, x), first) and len(builds) == 1
    conv = next(m for m in model.modules() if isinstance(getattr(m, "mask", None), torch.Tensor))
    with torch.no_grad():
        conv.mask[0, 0, 0, 0] = 0                        # one more pinned weight, changed in place
    assert torch.allclose(fisher_scores(model, x), fisher_scores_reference(model, x), atol=1e-5)
    assert len(builds) == 2 and fisher_scores(model, x).shape[1] == first.shape[1] - 1
    conv.bias = torch.nn.Parameter(conv.bias.detach().clone())
    fisher_scores(model, x)
    monkeypatch.setattr(scores, "UNFOLD_UP_TO", 0)
    fisher_scores(model, x)
    assert len(builds) == 4


def test_what_a_call_learns_does_not_outlive_it():
    """A layer demoted to vmap during one call (its input is not per image) is planned afresh by the next:
    the cached plan keeps it on its rule, so every call's bits are those of a first call."""
    import fisher.scores as scores

    class BroadcastInput(torch.nn.Module):               # a Linear on a buffer (batch dim 1, not the images)
        def __init__(self):
            super().__init__()
            self.register_buffer("pos", torch.randn(1, 64, 3))
            self.embed, self.conv = torch.nn.Linear(3, 1), torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x.float() * 2 - 1) + self.embed(self.pos).view(1, 1, 8, 8)

        def log_prob_from_output(self, out, x):
            return -torch.nn.functional.softplus(out).flatten(1).sum(1)

        def log_prob(self, x):
            return self.log_prob_from_output(self(x), x)

    torch.manual_seed(0)
    m = BroadcastInput().eval()
    x = torch.randint(0, 2, (4, 1, 8, 8))
    first = fisher_scores(m, x)
    assert dict(score_plan(m))["embed.weight"] == "linear"          # the static plan: still on its rule
    assert dict(score_plan(m, x))["embed.weight"] == "vmap"         # demoted when it runs
    assert any(layer.module is m.embed for layer in scores._PLANS[m][1].layers)
    assert torch.equal(fisher_scores(m, x), first)
