"""Per-layer score rules of fisher.scores: every layer type against one backward pass per image.

Small random models with strided / dilated / padded / grouped / masked convs, transposed convs,
Linear layers on (B, in) and (B, ..., in), weight-normed layers (both APIs), a bare Parameter,
norm-layer affines, shared modules and in-place ops; each checked for (a) exactness, (b) the rule
every parameter takes (no covered layer on the vmap fallback), (c) projection of layer blocks,
(d) bitwise batch-size invariance with a projection; and each method of the stride-1 rule forced on
every layer.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

import fisher.scores
from fisher.likelihoods import Bernoulli
from fisher.priors import build_prior
from fisher.projection import ProjectionStack, SparseProjection
from fisher.scores import (
    fisher_scores,
    fisher_scores_reference,
    fisher_scores_vmap,
    free_masks,
    n_features,
    score_plan,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")]


class Toy(nn.Module):
    """A binary-image model: ``forward`` gives one Bernoulli logit per pixel."""
    likelihood = Bernoulli(2)

    def log_prob_from_output(self, out, x):
        return self.likelihood.log_prob(out, x).flatten(1).sum(1)

    def log_prob(self, x):
        return self.log_prob_from_output(self(x), x)


class MaskedConv(nn.Conv2d):
    """A conv with a random mask buffer (some kernel offsets entirely pinned), any stride/dilation."""

    def __init__(self, *args, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        mask = (torch.rand(self.weight.shape, generator=gen) < 0.6).float()
        mask[:, :, -1, :] = 0                                    # a pinned kernel row
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvZoo(Toy):
    def __init__(self):
        super().__init__()
        self.s2 = nn.Conv2d(1, 4, 3, stride=2, padding=1)                         # 8x8 -> 4x4
        self.one_s2 = nn.Conv2d(1, 4, 1, stride=2)                                 # 1x1, strided
        self.dil = nn.Conv2d(4, 4, 3, dilation=2, padding=2)
        self.same = nn.Conv2d(4, 4, (2, 3), padding="same")                        # uneven 'same' padding
        self.refl = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.grp = nn.Conv2d(4, 6, 3, padding=(1, 2), stride=(1, 2), groups=2, bias=False)   # 4x4 -> 4x3
        self.masked = MaskedConv(6, 4, 3, padding=(2, 3), dilation=2, stride=(1, 1))   # 4x3 -> 4x5
        self.valid = nn.Conv2d(4, 4, (1, 2), padding="valid")                      # 4x5 -> 4x4
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)   # 4x4 -> 8x8
        self.out = nn.Conv2d(3, 1, 1)                                              # 1x1 stride 1

    def forward(self, x):
        h = x.float() * 2 - 1
        a = torch.tanh(self.s2(h) + self.one_s2(h))
        a = torch.tanh(self.dil(a))
        a = torch.tanh(self.same(a))
        a = torch.tanh(self.refl(a))
        a = torch.tanh(self.grp(a))
        a = torch.tanh(self.masked(a))
        a = torch.tanh(self.valid(a))
        return self.out(torch.tanh(self.up(a)))


class Stride1Zoo(Toy):
    """Stride-1 convs taking each method of their rule: im2col (1 channel, few inputs), one bmm per
    offset over rows that share their padding (with a pinned kernel row), no padding, padding at least
    the kernel (the W + 2p grid), a 2 × 2 map under a 7 × 7 kernel (offsets reading only padding),
    a 1 × 3 kernel, and 1 × 1 convs with and without padding."""

    def __init__(self):
        super().__init__()
        self.a1 = MaskedConv(1, 8, 5, padding=2, seed=1)                           # 8x8
        self.wide = MaskedConv(8, 16, 5, padding=2, seed=2)                        # 8x8
        self.valid = nn.Conv2d(16, 16, 3, padding=0)                               # 8x8 -> 6x6
        self.big_pad = nn.Conv2d(16, 16, 3, padding=3)                             # 6x6 -> 10x10
        self.down = nn.Conv2d(16, 16, 4, stride=4)                                 # 10x10 -> 2x2
        self.tiny = nn.Conv2d(16, 16, 7, padding=3)                                # 2x2
        self.rect = nn.Conv2d(16, 16, (1, 3), padding=(0, 1))                      # 2x2
        self.one = nn.Conv2d(16, 16, 1)                                            # 2x2
        self.one_pad = nn.Conv2d(16, 16, 1, padding=1, bias=False)                 # 2x2 -> 4x4
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        h = torch.tanh(self.a1(x.float() * 2 - 1))
        w = torch.tanh(self.wide(h))
        a = torch.tanh(self.big_pad(torch.tanh(self.valid(w))))
        a = torch.tanh(self.tiny(torch.tanh(self.down(a))))
        a = torch.tanh(self.one(torch.tanh(self.rect(a))))
        a = F.interpolate(torch.tanh(self.one_pad(a)), size=(8, 8))
        return self.out(a + w)


class TransposeZoo(Toy):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 4, stride=4)                                   # 8x8 -> 2x2
        self.t1 = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=0, output_padding=1)   # 2x2 -> 6x6
        self.t2 = nn.ConvTranspose2d(4, 2, 2, stride=1, dilation=2, padding=1, groups=2)   # 6x6 -> 6x6
        self.t3 = nn.ConvTranspose2d(2, 1, 3, stride=(1, 2), padding=(0, 2), output_padding=(0, 1), bias=False)
        self.t4 = nn.ConvTranspose2d(4, 1, 4, stride=4)                            # 2x2 -> 8x8

    def forward(self, x):
        h = x.float() * 2 - 1
        d = torch.tanh(self.down(h))
        u = torch.tanh(self.t2(torch.tanh(self.t1(d))))
        u = self.t3(u, output_size=(8, 9))[:, :, :, :8]                            # 6x6 -> 8x9 (output_size)
        return u + self.t4(d)


class LinearZoo(Toy):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.cond = nn.Linear(4, 4)                                                 # (B, in)
        self.rows = nn.Linear(4, 3)                                                 # (B, L, in)
        self.cells = nn.Linear(3, 1, bias=False)                                    # (B, H, W, in)
        self.head = nn.Linear(64, 64)                                               # flatten -> logits

    def forward(self, x):
        h = torch.tanh(self.conv(x.float() * 2 - 1))                                # (B, 4, 8, 8)
        h = h + self.cond(h.mean((2, 3)))[:, :, None, None]
        r = torch.tanh(self.rows(h.flatten(2).transpose(1, 2)))                     # (B, 64, 3)
        c = self.cells(r.view(-1, 8, 8, 3)).squeeze(-1)                              # (B, 8, 8)
        return (c.flatten(1) + self.head(c.flatten(1))).view(-1, 1, 8, 8)


class WeightNormZoo(Toy):
    def __init__(self):
        super().__init__()
        self.s2 = weight_norm(nn.Conv2d(1, 4, 3, stride=2, padding=1))                    # dim 0
        masked = MaskedConv(4, 4, 3, padding=1, seed=3)
        self.masked = weight_norm(masked, dim=1)                                          # masked, dim 1
        self.up = weight_norm(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1))
        self.up_all = weight_norm(nn.ConvTranspose2d(4, 3, 2, stride=2), dim=None)        # one norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.legacy = torch.nn.utils.weight_norm(nn.Conv2d(3, 1, 1))                  # weight_g, weight_v
        self.lin = weight_norm(nn.Linear(4, 4, bias=False))

    def forward(self, x):
        h = torch.tanh(self.s2(x.to(self.s2.bias.dtype) * 2 - 1))
        h = torch.tanh(self.masked(h)) + self.lin(h.mean((2, 3)))[:, :, None, None]
        h = torch.tanh(self.up(h) + self.up_all(h))
        return self.legacy(h)


class Shared(Toy):
    """A conv called twice, a transposed conv and a Linear called twice, an output used twice,
    in-place ops on recorded outputs and inputs, a bare Parameter and norm-layer affines."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.conv_again = self.conv                          # one module under two names
        self.s2 = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.lin = nn.Linear(2, 2)
        self.norm = nn.GroupNorm(1, 2)
        self.up = nn.ConvTranspose2d(2, 1, 2, stride=2)
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        h = self.s2(x.float() * 2 - 1)
        h = F.relu(h, inplace=True)                          # in place on a recorded output
        a = self.conv(h)
        a = torch.tanh(a) * a + a                            # the output used three times
        b = self.conv_again(torch.tanh(a))                   # the same conv again
        b = self.norm(b)
        b = b + self.lin(self.lin(b.mean((2, 3))))[:, :, None, None]    # one Linear called twice
        logits = self.up(b) + self.up(b.flip(3)).flip(3)     # the transposed conv twice
        return logits * self.temperature


class BroadcastInput(Toy):
    """A Linear applied to a buffer (batch dim 1, not the images): its rule cannot apply per image;
    and a weight tied between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.randn(1, 64, 3))
        self.embed = nn.Linear(3, 1)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.tie_a = nn.Linear(8, 8)
        self.tie_b = nn.Linear(8, 8)
        self.tie_b.weight = self.tie_a.weight

    def forward(self, x):
        h = self.conv(x.float() * 2 - 1) + self.embed(self.pos).view(1, 1, 8, 8)
        return self.tie_b(torch.tanh(self.tie_a(h)))


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def _images(n, seed=0):
    return torch.randint(0, 2, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "convs": (ConvZoo, {"s2": "conv2d", "one_s2": "conv2d", "dil": "conv2d", "same": "conv2d",
                        "refl": "conv2d", "grp": "conv2d", "masked": "conv2d", "valid": "conv2d",
                        "up": "conv_transpose2d", "out": "conv2d/stride1"}),
    "stride1": (Stride1Zoo, {"down": "conv2d", **{n: "conv2d/stride1" for n in (
        "a1", "wide", "valid", "big_pad", "tiny", "rect", "one", "one_pad", "out")}}),
    "transposed": (TransposeZoo, {"down": "conv2d", "t1": "conv_transpose2d", "t2": "conv_transpose2d",
                                  "t3": "conv_transpose2d", "t4": "conv_transpose2d"}),
    "linear": (LinearZoo, {"conv": "conv2d/stride1", "cond": "linear", "rows": "linear", "cells": "linear",
                           "head": "linear"}),
    "weight_norm": (WeightNormZoo, {"s2": "conv2d+weight_norm", "masked": "conv2d+weight_norm",
                                    "up": "conv_transpose2d+weight_norm", "up_all": "conv_transpose2d+weight_norm",
                                    "legacy": "conv2d+weight_norm", "lin": "linear+weight_norm"}),
    "shared": (Shared, {"conv": "conv2d/stride1", "s2": "conv2d", "lin": "linear", "norm": "vmap",
                        "up": "conv_transpose2d", "temperature": "vmap"}),
    "broadcast": (BroadcastInput, {"embed": "vmap", "conv": "conv2d/stride1", "tie_a": "vmap", "tie_b": "vmap"}),
}


def _expected_rule(name, table):
    return table[name.split(".")[0]]


@pytest.fixture(params=["grouped", "per_offset"])
def method(request, monkeypatch):
    """Both exact methods of the conv rules: one grouped convolution_backward per call, or one bmm per
    kernel offset (chosen per layer by channel count, and for stride-1 convs per call by output size;
    forced here on every layer that can take it)."""
    grouped = request.param == "grouped"
    monkeypatch.setattr(fisher.scores, "GROUPED_BELOW", 10**9 if grouped else 0)
    monkeypatch.setattr(fisher.scores, "GROUPED_FROM_POSITIONS", 1 if grouped else 10**9)
    return request.param


def test_method_choice():
    """The grouped method is taken by unmasked strided / transposed convs below GROUPED_BELOW,
    never by a mask with pinned kernel offsets, nor by the stride-1 rule or Linear."""
    plan = fisher.scores._make_plan(_model(ConvZoo))
    grouped = {layer.params[0][0].split(".")[0] for layer in plan.layers if layer.grouped}
    assert grouped == {"s2", "one_s2", "dil", "same", "refl", "grp", "valid", "up"}
    big = nn.Conv2d(160, 160, 3, stride=2)
    assert not fisher.scores._make_plan(big).layers[0].grouped


def _close(fast, ref):
    """Gram matrices within 1e-5 relative, entries within 1e-5 of the largest one."""
    gram, gram_ref = fast @ fast.T, ref @ ref.T
    assert float((gram - gram_ref).norm() / gram_ref.norm()) <= 1e-5
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("key", sorted(MODELS))
def test_rules_match_reference(key, method):
    """(a) exact against one backward pass per image, for several chunk sizes."""
    m = _model(MODELS[key][0])
    x = _images(5)
    ref = fisher_scores_reference(m, x)
    assert ref.shape == (5, n_features(m))
    for chunk in (2, 5, 16):
        _close(fisher_scores(m, x, chunk_size=chunk), ref)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_covered_layer_takes_its_rule(key):
    """(b) the rule every parameter takes, after a run (run-time checks included)."""
    cls, table = MODELS[key]
    m = _model(cls)
    plan = score_plan(m, _images(3))
    assert [n for n, _ in plan] == [n for n, _ in m.named_parameters()]
    assert {n: r for n, r in plan} == {n: _expected_rule(n, table) for n, _ in plan}
    static = dict(score_plan(m))                              # before any run: broadcast still looks covered
    assert all(static[n] == r for n, r in plan if r != "vmap" or static[n] == "vmap")


def test_weight_norm_parameter_names_and_order():
    m = _model(WeightNormZoo)
    names = [n for n, _ in m.named_parameters()]
    assert names[:3] == ["s2.bias", "s2.parametrizations.weight.original0", "s2.parametrizations.weight.original1"]
    assert "legacy.weight_g" in names and "legacy.weight_v" in names
    assert dict(m.named_parameters())["up_all.parametrizations.weight.original0"].dim() == 0
    assert n_features(m) == sum(p.numel() for p in m.parameters())      # g and v: every entry is free


@pytest.mark.parametrize("key", ["convs", "transposed", "weight_norm", "shared"])
def test_projected_scores_equal_projection_of_scores(key, method):
    """(c) per-layer blocks projected as produced = projection of the whole score."""
    m = _model(MODELS[key][0])
    x = _images(6, seed=1)
    n = n_features(m)
    projs = [SparseProjection(n, 48, None, seed=0), SparseProjection(n, 16, 1.0, seed=1)]
    g = fisher_scores(m, x, chunk_size=4)
    zs = fisher_scores(m, x, projs, chunk_size=4)
    for z, p in zip(zs, projs):
        want = g @ p.dense().t()
        assert torch.allclose(z, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(fisher_scores(m, x, projs[0], chunk_size=4), zs[0])


@pytest.mark.parametrize("key", sorted(MODELS))
def test_embedding_independent_of_batch_size(key, method):
    """(d) bitwise, for a fixed chunk size (last chunk padded)."""
    m = _model(MODELS[key][0])
    x = _images(11, seed=2)
    p = SparseProjection(n_features(m), 24, seed=2)
    full = fisher_scores(m, x, p, chunk_size=16)
    for rows in (slice(3, 7), slice(10, 11)):
        assert torch.equal(fisher_scores(m, x[rows], p, chunk_size=16), full[rows])
    halves = torch.cat([fisher_scores(m, x[:5], p, chunk_size=16), fisher_scores(m, x[5:], p, chunk_size=16)])
    assert torch.equal(halves, full)


def test_fallback_alone_equals_vmap():
    """A model no rule covers takes the vmap path for every parameter, as fisher_scores_vmap."""
    class Conv1dModel(Toy):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(8, 8, 3, padding=1)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (self.c(x.float().squeeze(1)) * self.scale).unsqueeze(1)

    m = _model(Conv1dModel)
    x = _images(4)
    assert {r for _, r in score_plan(m, x)} == {"vmap"}
    ref = fisher_scores_reference(m, x)
    _close(fisher_scores(m, x), ref)
    _close(fisher_scores_vmap(m, x), ref)


def test_weight_norm_chain_rule_by_finite_differences():
    """∂ log p/∂g of one weight-normed layer, against a central difference in float64."""
    m = _model(WeightNormZoo).double()
    x = _images(1, seed=4)
    names = [n for n, _ in m.named_parameters()]
    g = fisher_scores_reference(m, x)[0]
    masks = free_masks(m)
    starts = dict(zip(names, torch.tensor([0] + [int(masks[n].sum()) for n in names]).cumsum(0).tolist()))
    p = dict(m.named_parameters())["up.parametrizations.weight.original0"]
    eps = 1e-6
    with torch.no_grad():
        p[1] += eps
        up = m.log_prob(x)
        p[1] -= 2 * eps
        down = m.log_prob(x)
        p[1] += eps
    fast = fisher_scores(m.float(), x)[0]
    k = starts["up.parametrizations.weight.original0"] + 1
    assert float(g[k]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-5)
    assert float(fast[k]) == pytest.approx(float(g[k]), rel=1e-4)


@pytest.mark.parametrize("grouped_from", [1, 10**9])
@pytest.mark.parametrize("unfold_up_to", [0, None, 10**9])
def test_stride1_methods_match_reference(unfold_up_to, grouped_from, monkeypatch):
    """Each method of the stride-1 rule, forced on every layer it can take (0: one bmm per kernel
    offset except for unpadded 1 × 1 convs; 10**9: im2col everywhere; None: the default choice; and
    the layers with several kernel offsets, none pinned, that im2col leaves: grouped on every call,
    grouped_from=1, or never), is exact against one backward pass per image."""
    if unfold_up_to is not None:
        monkeypatch.setattr(fisher.scores, "UNFOLD_UP_TO", unfold_up_to)
    monkeypatch.setattr(fisher.scores, "GROUPED_FROM_POSITIONS", grouped_from)
    m = _model(Stride1Zoo)
    plan = fisher.scores._make_plan(m)
    by_cols = {layer.params[0][0].split(".")[0] for layer in plan.layers
               if layer.block and layer.block.cols is not None}
    assert by_cols == {0: {"one", "out"}, None: {"a1", "rect", "one", "one_pad", "out"}}.get(
        unfold_up_to, {"a1", "wide", "valid", "big_pad", "tiny", "rect", "one", "one_pad", "out"})
    by_groups = {layer.params[0][0].split(".")[0] for layer in plan.layers
                 if layer.block and layer.block.grouped_from == grouped_from}
    assert by_groups == {0: {"valid", "big_pad", "tiny", "rect"}, None: {"valid", "big_pad", "tiny"}}.get(
        unfold_up_to, set())                      # not a1 and wide (a pinned kernel row), nor a 1 × 1 conv
    x = _images(5)
    ref = fisher_scores_reference(m, x)
    for chunk in (2, 5):
        _close(fisher_scores(m, x, chunk_size=chunk), ref)


def test_stride1_method_follows_each_calls_output_size(monkeypatch):
    """A stride-1 conv called on two map sizes takes the grouped method on the call at or above
    GROUPED_FROM_POSITIONS and one bmm per offset on the other; the summed score stays exact."""
    class TwoSizes(Toy):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, padding=1)                 # im2col: 9 inputs per output
            self.shared = nn.Conv2d(16, 16, 3, padding=1)
            self.out = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            h = torch.tanh(self.shared(torch.tanh(self.conv(x.float() * 2 - 1))))          # 8 × 8: 64 positions
            low = torch.tanh(self.shared(F.avg_pool2d(h, 2)))                                 # 4 × 4: 16
            return self.out(h + F.interpolate(low, size=(8, 8)))

    monkeypatch.setattr(fisher.scores, "GROUPED_FROM_POSITIONS", 64)
    m, x = _model(TwoSizes), _images(4)
    taken = []
    for name in ("_grouped_grads", "_weight_grads"):
        real = getattr(fisher.scores, name)
        monkeypatch.setattr(fisher.scores, name,
                            lambda *a, _real=real, _name=name, **k: taken.append((_name, a[-1].shape[-1])) or _real(*a, **k))
    _close(fisher_scores(m, x), fisher_scores_reference(m, x))
    # shared: grouped at 8 × 8, per offset at 4 × 4; conv (im2col) and out (1 × 1) at 8 × 8
    assert sorted(taken) == [("_grouped_grads", 8), ("_weight_grads", 4), ("_weight_grads", 8), ("_weight_grads", 8)]


def test_per_offset_blocks_are_stored_for_their_reader(monkeypatch):
    """The stride-1 blocks computed by one bmm per kernel offset (masked ones too) come stored features-major
    when fisher_scores projects them (each feature's B values side by side, which the column walk reads in
    place) and images-major without a projection (rows of the score matrix), with the same values; the
    other methods' blocks are images-major either way, and so is every block without the C library. The
    embedding's bits are the same either way."""
    monkeypatch.setattr(fisher.scores, "UNFOLD_UP_TO", 0)
    monkeypatch.setattr(fisher.scores, "GROUPED_FROM_POSITIONS", 10**9)
    m, x = _model(Stride1Zoo), _images(5)
    per_offset = {layer.block.w_offset for layer in fisher.scores._plan(m).layers
                  if layer.block and layer.block.cols is None}
    blocks = {}
    for features_major in (False, True):
        plan = fisher.scores._plan(m)
        plan.features_major = features_major
        blocks[features_major] = dict(fisher.scores._blocks(m, plan, x))
    assert len(per_offset) == 7 and set(blocks[True]) == set(blocks[False])
    for offset, g in blocks[True].items():
        assert fisher.scores._features_major(g) == (offset in per_offset)
        assert g.is_contiguous() or g.t().is_contiguous()
        assert blocks[False][offset].is_contiguous() and torch.equal(g, blocks[False][offset])
    seen = []
    real = ProjectionStack.accumulate_chunks
    monkeypatch.setattr(ProjectionStack, "accumulate_chunks", lambda self, acc, gs, offset=0: seen.append(
        (offset, fisher.scores._features_major(gs[0]))) or real(self, acc, gs, offset))
    monkeypatch.setattr(fisher.scores, "RUN_FEATURES", 1)             # every block projected alone
    p = SparseProjection(n_features(m), 32, seed=1)
    want = fisher_scores(m, x, p)
    assert sorted(seen) == sorted((offset, offset in per_offset) for offset in blocks[True])
    seen.clear()
    monkeypatch.setitem(fisher.scores.native._STATE, "lib", None)     # no C library: no cheap transpose
    got = fisher_scores(m, x, p)
    assert sorted(seen) == sorted((offset, False) for offset in blocks[True])
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_no_grad_context_and_frozen_layers():
    """Scores do not depend on an outer no_grad, nor on parameters' requires_grad flags."""
    m = _model(ConvZoo)
    x = _images(4)
    want = fisher_scores(m, x)
    with torch.no_grad():
        assert torch.equal(fisher_scores(m, x), want)
    for p in [*m.s2.parameters(), *m.one_s2.parameters()]:
        p.requires_grad_(False)
    assert torch.equal(fisher_scores(m, x), want)
