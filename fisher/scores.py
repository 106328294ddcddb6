"""Fisher scores ∇_θ log p_θ(x), exact per image (paper sec. 3.2 and 4.1).

The score of image x is the gradient of log p_θ(x) (not of the NLL) with
respect to every *free* parameter of the prior, in eval mode, in float32
(sec. 3.2: the Fisher score as a latent code). Weights pinned to zero by a
causal mask have exactly-zero gradients and are left out, so ``n_features``
counts only free entries. Features are ordered as ``model.named_parameters()``,
each parameter's free entries in row-major order. The embedding of sec. 4.1
(eq. 1) is the random projection of that vector; it is applied layer by
layer (below), so the full score matrix never exists when a projection is
given.

How the scores are computed: one forward pass with forward hooks on every
layer that has a per-layer rule (they record each call's input and output),
one backward pass to those layer *outputs* only (Δ = ∂ log p / ∂ output, no
summed parameter gradients), then each layer's per-image parameter gradients
from its recorded input and Δ. Rules (``score_plan`` says which one every
parameter takes):

* ``conv2d/stride1`` — ``nn.Conv2d``, stride 1, dilation 1, groups 1, zero
  padding (the PixelCNN and Gated PixelCNN layers, 1×1 convs included). For
  kernel offset (i, j), ∂/∂W[:, :, i, j] = Δ_b · X_b(i, j)ᵀ with X_b(i, j) the
  padded input shifted by (i, j): one batched matmul per offset the mask leaves
  free (about half of a 7×7 kernel), the shifted inputs read as strided views
  of one channels-last buffer, so no patches are copied, over the rows where
  the shifted input is not all padding. A layer with few inputs per output
  (the first layer on 1 or 3 image channels) takes one im2col and one bmm.
  On CPU, a call with at least ``GROUPED_FROM_POSITIONS`` output positions
  of a layer whose kernel offsets are all free (PixelCNN++'s shifted convs,
  unlike the masked 7×7 ones) takes the grouped method below instead.
* ``conv2d`` — any other ``nn.Conv2d``: stride s, dilation d, int/tuple/'same'/
  'valid' padding in any ``padding_mode``, groups. y[o, p] = Σ W[o, c, i, j]
  x_pad[c, s·p + d·(i, j)], so ∂/∂W[:, :, i, j] = Δ_b · X_b(i, j)ᵀ with
  X_b(i, j) = x_pad[:, d·i :: s, d·j :: s] (H_out × W_out samples); the input
  is padded as the layer pads it; with groups, each group's channel block is a
  separate batch of the same bmm. Memory: one input-sized gather per offset.
  Layers with few channels (in × out per group < ``GROUPED_BELOW``) and no
  kernel offset pinned by a mask compute the same gradients instead as one
  grouped ``convolution_backward`` per call, image b's channels becoming
  groups of a single-image convolution with B·groups groups (the trick
  torch.func uses per sample; faster there on CPU, same values to round-off).
* ``conv_transpose2d`` — ``nn.ConvTranspose2d`` (any stride, padding,
  output_padding, dilation, groups). y[o, s·p + d·(i, j) − pad] += x[c, p]
  W[c, o, i, j], so ∂/∂W[:, :, i, j] = X_b · Δ_pad,b(i, j)ᵀ with Δ_pad the
  output gradient zero-padded by ``padding`` and Δ_pad,b(i, j) =
  Δ_pad[:, d·i :: s, d·j :: s] (H_in × W_in samples); output_padding only adds
  rows that no weight reaches (their Δ is never read). Same two methods as
  ``conv2d``.
* ``linear`` — ``nn.Linear`` on (B, in) or (B, …, in): ∂/∂W = Σ_… Δ_bᵀ x_b,
  one bmm over the flattened extra dims.
* biases of all of these: Σ of Δ over every non-channel dimension.
* ``…+weight_norm`` — any of the layers above under
  ``torch.nn.utils.parametrizations.weight_norm`` (parameters
  ``parametrizations.weight.original0`` = g, ``original1`` = v) or the older
  ``torch.nn.utils.weight_norm`` (``weight_g``, ``weight_v``), as PixelCNN++
  uses: the score is with respect to g and v themselves. With G the per-image
  gradient of the effective weight w = g·v/‖v‖ (the rule above, times the
  layer's ``mask`` if it has one), n = ‖v‖ over every dimension but ``dim``
  and v̂ = v/n: ∂/∂g = Σ G ⊙ v̂ (summed over those dimensions) and
  ∂/∂v = (g/n)(G − (∂/∂g) v̂).
* ``vmap`` — a parameter no rule covers (a bare ``nn.Parameter``, norm
  layers' affine parameters, Conv1d/Conv3d, an ``nn.Parameter`` tied between
  two modules, a layer whose call breaks a rule's assumptions at run time):
  ``torch.func`` vmap of grad over ``functional_call``, differentiating only
  those parameters, all of them in one call per chunk. The other layers keep
  their rules.

A module called several times in one forward pass (shared weights) gets the
sum of its per-call gradients; an output used several times simply gets the
summed Δ from autograd. If a recorded input or output is modified in place
later in the forward pass, the chunk is recomputed with the hooks copying it.
The rules assume what the prior contract (``fisher.priors.base``) states: a
covered module computes exactly its layer's operation on its first input
with ``weight`` (times ``mask``, when it has one) and ``bias``, and dimension
0 of every call indexes the images of the batch; each call is checked for
the shapes its layer type implies, and a module whose call does not fit is
moved to the ``vmap`` rule.

Memory: the batch is processed ``chunk_size`` images at a time, and within a
chunk the per-layer blocks (B, n_free of that parameter) are projected as
they are produced and then dropped, so with a projection the peak is one
chunk's activations plus one layer's block, independent of the batch size;
without one, the output (B, n_features) itself is the only thing that grows
with B.

Layout: a block (B, n_free) may be stored either way round. When they are
projected, the per-offset stride-1 blocks are stored features-major (each
feature's B values side by side: the per-offset products, (K·B) × (Cout·Cin),
transposed once by a tiled copy, :func:`fisher.native.transposed`), so the
projection's column walk reads each feature's values in place instead of
gathering them from B rows (the paper-size Pyramid's projection: 0.70 -> 0.37 s
per 32 images). Without a projection every block is images-major, rows of the
score matrix, and so is every block on a CPU without the C library (torch's
strided transpose would cost what the projection gains). Adjacent narrow
blocks are joined in the layout most of their features have (:func:`_runs`).
Values, and the embedding's bits, are the same either way.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher import native
from fisher.projection import ProjectionStack, SparseProjection

DEFAULT_CHUNK = 64
SMALL_PRIOR_FEATURES = 1 << 21   # priors up to this many features: DEFAULT_CHUNK images per pass; larger: half
GROUP_BYTES = 256 << 20      # scores held at once to project several chunks together (CPU, dense projections)
FALLBACK = "vmap"
# A strided / transposed conv with fewer (in × out channels per group) than this, and no kernel
# offset pinned by a mask, takes one grouped convolution_backward per call (images as groups);
# otherwise one bmm per free kernel offset (on an input-sized gather). Measured on CPU (1 thread,
# 32 images, k2–k4, stride 2): grouped is 1.5–3× faster at 8–64 channels, the two are within
# noise at 160. Both are exact.
GROUPED_BELOW = 128 * 128
# A stride-1 conv with (in channels × free kernel offsets) at most this takes one im2col and one bmm per
# call instead of one bmm per offset (whose products would be matrix-vector products). Measured on CPU
# (2 threads, 32 images 28×28, 64 filters, kernel 7): 1 channel 2.2 ms against 12.2, 3 channels 5.7
# against 12.5, 8 channels 34 against 12.6.
UNFOLD_UP_TO = 96
# A stride-1 conv on CPU whose kernel has more than one offset, none pinned by a mask, and that is not
# taken by the im2col method above, takes the grouped method of the strided convs (one grouped
# convolution_backward per call: oneDNN's kernels) on calls with at least this many output positions,
# and one bmm per offset below. Measured on CPU (AMD EPYC, 2 threads, 32 images, 2×3 and 2×2 kernels,
# 16–160 channels): grouped takes 0.70–0.85× the time at 32×32 outputs, 0.7–1.3× at 16×16 and up to
# 1.3× at 4×4–8×8; 1×1 convs are 1.4–8× slower grouped, and stay one bmm. Same values to round-off,
# and each image's bits do not depend on the batch or the thread count (checked for both methods).
GROUPED_FROM_POSITIONS = 32 * 32
# With a projection, adjacent blocks narrower than this are projected together, joined into runs at least
# this wide: the column walk of a wide run costs less than the row walks of its pieces (the builtin CelebA
# Pyramid PixelCNN's 229 blocks, all narrower than 16 384 features: 134 ms per 32 images one by one,
# 43 ms in runs of 32 768, 42 ms in runs of 65 536; 2 threads).
RUN_FEATURES = 1 << 16


def free_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Boolean mask of free entries for every parameter, by name."""
    owners = {f"{mod_name}.{p_name}" if mod_name else p_name: mod
              for mod_name, mod in model.named_modules() for p_name, _ in mod.named_parameters(recurse=False)}
    masks = {}
    for name, p in model.named_parameters():
        mod = owners[name]
        mask = getattr(mod, "mask", None)
        if name.endswith("weight") and isinstance(mask, torch.Tensor) and mask.shape == p.shape:
            masks[name] = mask != 0
        else:
            masks[name] = torch.ones_like(p, dtype=torch.bool)
    return masks


def n_features(model: nn.Module) -> int:
    """Length of the Fisher score: the number of free parameters."""
    return sum(int(m.sum()) for m in free_masks(model).values())


def activations(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The paper's baseline: the prior's second-to-last conv layer activations, flattened."""
    with torch.no_grad():
        return model.eval().hidden(x).flatten(1).float()


# ---------------------------------------------------------------- references
def fisher_scores_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Slow reference: one backward pass per image."""
    model.eval()
    masks = free_masks(model)
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model.log_prob(x[i:i + 1]).sum(), list(params.values()))
        rows.append(torch.cat([g[masks[n]] for n, g in zip(params, grads)]))
    return torch.stack(rows)


def fisher_scores_vmap(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Generic per-sample gradients with ``torch.func`` (vmap of grad); works for any model."""
    model.eval()
    masks = free_masks(model)
    g = _func_grads(model, [n for n, _ in model.named_parameters()], x)
    return torch.cat([_select(g[n], masks[n]) for n in masks], dim=1)


def _func_grads(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image gradients (B, *shape) of the parameters ``names`` only, by vmap of grad; the other
    parameters enter as constants, so one call covers all of them."""
    from torch.func import grad, vmap
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    wanted = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in wanted}

    def log_prob(sub, xi):
        return _log_prob_functional(model, {**rest, **sub}, buffers, xi.unsqueeze(0))

    return vmap(grad(log_prob), in_dims=(None, 0))(wanted, x)


def _log_prob_functional(model, params, buffers, x):
    from torch.func import functional_call
    out = functional_call(model, (params, buffers), (x,))
    head = getattr(model, "log_prob_from_output", None) or model.log_prob_from_logits
    return head(out, x).sum()


def _select(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Free entries of per-image gradients ``g`` (B, *mask.shape), row-major: (B, n_free)."""
    g = g.reshape(g.shape[0], -1)
    return g if bool(mask.all()) else g[:, mask.reshape(-1)]


# ---------------------------------------------------------------- fast path: layout
@dataclass
class _ConvBlock:
    module: nn.Conv2d
    offsets: list[tuple[int, int]]       # kernel positions with any free weight
    select: torch.Tensor | None          # free entries within (out, in, offsets); None = all of them
    n_weight: int
    w_offset: int                        # feature offset of the weight block
    b_offset: int | None                 # feature offset of the bias block
    cols: torch.Tensor | None = None     # rows of F.unfold's output to multiply (small layers), else None
    grouped_from: int | None = None      # calls with this many output positions or more: grouped method


@dataclass(eq=False)
class _Layer:
    """One module with a per-layer rule, and where its parameters' features go."""
    module: nn.Module
    kind: str                            # conv2d/stride1 | conv2d | conv_transpose2d | linear
    params: list[tuple[str, str]]        # (parameter name, role) in named_parameters order; role: weight|bias|g|v
    norm: str | None = None              # None | "weight_norm" (parametrizations) | "weight_norm_legacy"
    norm_dim: int = 0
    offsets: list[tuple[int, int]] | None = None    # conv kernel positions computed
    grouped: bool = False                # conv weight gradients by one grouped convolution_backward
    select: torch.Tensor | None = None   # free entries of the computed weight block (None: all)
    block: _ConvBlock | None = None      # the conv2d/stride1 layout

    @property
    def rule(self) -> str:
        return self.kind + ("+weight_norm" if self.norm else "")


@dataclass
class _Plan:
    layers: list[_Layer]
    fallback: list[str]                  # parameters computed by _func_grads, in named_parameters order
    offsets: dict[str, int]              # feature offset of every parameter
    masks: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    n_features: int                      # free entries of all parameters: the score's length
    copy_io: set = field(default_factory=set)     # modules whose recorded input/output is changed in place later
    features_major: bool = False                  # per-offset conv blocks stored features-major (for a projection)

    def demote(self, layer: _Layer) -> None:
        self.layers.remove(layer)
        order = list(self.offsets)
        self.fallback = sorted(self.fallback + [n for n, _ in layer.params], key=order.index)

    def rules(self) -> list[tuple[str, str]]:
        by = {n: layer.rule for layer in self.layers for n, _ in layer.params}
        return [(n, by.get(n, FALLBACK)) for n in self.offsets]


_KINDS = ((nn.Conv2d, "conv2d"), (nn.ConvTranspose2d, "conv_transpose2d"), (nn.Linear, "linear"))


def _layer_roles(mod: nn.Module):
    """(kind, norm, norm_dim, {local parameter name: role}) for a module some rule covers, else None."""
    kind = next((k for cls, k in _KINDS if isinstance(mod, cls)), None)
    if kind is None:
        return None
    if kind != "linear" and len(mod.kernel_size) != 2:
        return None
    own = [n for n, _ in mod.named_parameters(recurse=False)]
    every = [n for n, _ in mod.named_parameters()]
    from torch.nn.utils.weight_norm import WeightNorm
    legacy = [h for h in mod._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
    if getattr(mod, "parametrizations", None) is not None:
        from torch.nn.utils.parametrizations import _WeightNorm
        plist = getattr(mod.parametrizations, "weight", None)
        if (legacy or set(mod.parametrizations.keys()) != {"weight"} or len(plist) != 1
                or not isinstance(plist[0], _WeightNorm) or set(own) - {"bias"}):
            return None
        roles = {"parametrizations.weight.original0": "g", "parametrizations.weight.original1": "v"}
        norm, dim = "weight_norm", plist[0].dim
    elif legacy:
        if len(legacy) != 1 or legacy[0].name != "weight" or set(own) - {"bias", "weight_g", "weight_v"}:
            return None
        roles = {"weight_g": "g", "weight_v": "v"}
        norm, dim = "weight_norm_legacy", legacy[0].dim
    else:
        roles, norm, dim = {"weight": "weight"}, None, 0
    if "bias" in own:
        roles["bias"] = "bias"
    if set(every) != set(roles):
        return None
    return kind, norm, dim, roles


def _used_offsets(mask: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Kernel positions where ``mask`` (…, …, kh, kw) has a non-zero, and their flat indices."""
    kw = mask.shape[3]
    idx = (mask != 0).flatten(2).any(1).any(0).nonzero().squeeze(1)
    return [divmod(k, kw) for k in idx.tolist()], idx


def _make_plan(model: nn.Module) -> _Plan:
    masks = free_masks(model)
    offsets, at = {}, 0
    for name, m in masks.items():
        offsets[name] = at
        at += int(m.sum())
    owners = Counter(id(p) for mod in model.modules() for p in mod._parameters.values() if p is not None)
    by_name = dict(model.named_parameters())
    found = {}                                            # parameter name -> (layer, role)
    for mod_name, mod in model.named_modules():
        spec = _layer_roles(mod)
        if spec is None:
            continue
        kind, norm, dim, roles = spec
        full = {f"{mod_name}.{n}" if mod_name else n: r for n, r in roles.items()}
        if any(n not in by_name or owners[id(by_name[n])] > 1 for n in full):
            continue                                      # a parameter tied to another module's: vmap
        layer = _Layer(mod, kind, [], norm, dim)
        for n, r in full.items():
            found[n] = (layer, r)
    for name in masks:                                    # parameters in named_parameters order
        if name in found:
            layer, role = found[name]
            layer.params.append((name, role))
    ordered = []
    for name in masks:
        if name in found and found[name][0] not in ordered:
            ordered.append(found[name][0])
    for layer in ordered:
        _prepare(layer, masks, offsets)
    fallback = [n for n in masks if n not in found]
    return _Plan(ordered, fallback, offsets, masks, by_name, at)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _plan_key(model: nn.Module) -> tuple:
    """What a plan depends on: the parameters (identity, shape, device, dtype: a replaced or moved one
    changes it), every module's mask (identity and version: one changed in place changes it), the
    module types, and the thresholds that choose the methods."""
    params = tuple((n, id(p), tuple(p.shape), p.device, p.dtype) for n, p in model.named_parameters())
    mods = tuple((type(m), id(getattr(m, "mask", None)), getattr(getattr(m, "mask", None), "_version", None))
                 for m in model.modules())
    return params, mods, UNFOLD_UP_TO, GROUPED_BELOW, GROUPED_FROM_POSITIONS


def _plan(model: nn.Module) -> _Plan:
    """A fresh copy of ``model``'s plan, built once per model (and again when :func:`_plan_key` changes):
    for the paper-size Pyramid PixelCNN (705 layers) building it takes 0.16-0.25 s, about 3 % of a
    training step on 32 images.
    Each call gets its own copy, so what one call learns (a layer demoted to vmap, one whose input is
    changed in place) never changes another call's bits."""
    key = _plan_key(model)
    cached = _PLANS.get(model)
    if cached is None or cached[0] != key:       # the masks are kept too, so that their ids are not reused
        cached = _PLANS[model] = (key, _make_plan(model), [getattr(m, "mask", None) for m in model.modules()])
    plan = cached[1]
    return _Plan(list(plan.layers), list(plan.fallback), plan.offsets, plan.masks, plan.params, plan.n_features)


def _prepare(layer: _Layer, masks, feature_offsets) -> None:
    """Kernel offsets, method and free-entry selection of one layer's weight block."""
    mod = layer.module
    names = {r: n for n, r in layer.params}
    if layer.kind == "linear":
        if layer.norm is None:
            wmask = masks[names["weight"]]
            layer.select = None if bool(wmask.all()) else wmask.flatten().nonzero().squeeze(1)
        return
    if layer.norm is not None:                            # the whole weight gradient is needed
        wmask = torch.ones_like(masks[names["v"]])
        mask = getattr(mod, "mask", None)
        if isinstance(mask, torch.Tensor) and mask.shape == wmask.shape:
            wmask = mask != 0                             # offsets the mask pins have G = 0
    else:
        wmask = masks[names["weight"]]
    layer.offsets, idx = _used_offsets(wmask)
    kh, kw = wmask.shape[2:]
    layer.grouped = len(layer.offsets) == kh * kw and wmask.shape[0] * wmask.shape[1] < GROUPED_BELOW
    if layer.norm is None:
        sub = wmask.flatten(2)[:, :, idx].flatten()       # free flags over (dim0, dim1, offsets)
        layer.select = None if bool(sub.all()) else sub.nonzero().squeeze(1)
    if (layer.kind == "conv2d" and layer.norm is None and mod.stride == (1, 1) and mod.dilation == (1, 1)
            and mod.groups == 1 and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros"):
        layer.kind, layer.grouped = "conv2d/stride1", False
        b_offset = feature_offsets[names["bias"]] if "bias" in names else None
        layer.block = _ConvBlock(mod, layer.offsets, layer.select, int(wmask.sum()),
                                 feature_offsets[names["weight"]], b_offset)
        c_in, kk = wmask.shape[1], kh * kw
        if c_in * len(layer.offsets) <= UNFOLD_UP_TO or (kk == 1 and mod.padding == (0, 0)):
            layer.block.cols = (torch.arange(c_in, device=idx.device).unsqueeze(1) * kk + idx).flatten()
        elif kk > 1 and len(layer.offsets) == kk and mod.weight.device.type == "cpu":
            layer.block.grouped_from = GROUPED_FROM_POSITIONS


# ---------------------------------------------------------------- fast path: rules
def _weight_grads(block: _ConvBlock, inp: torch.Tensor, delta: torch.Tensor, features_major: bool = False
                  ) -> torch.Tensor:
    """Per-image gradients of the free weights of one stride-1 conv: (B, n_free).

    For kernel offset (i, j) the gradient is Δ_b · X_b(i, j)ᵀ, where X_b(i, j)
    is the padded input shifted by (i, j). With the input channels-last and
    the output grid widened to the row stride of the padded buffer, each
    shifted input is a plain strided view of the same buffer, so no patches
    are copied: one batched matmul per free offset. Rows share their padding
    (the right padding of row r is the left padding of row r + 1), so the grid
    is W + p wide rather than W + 2p, and each offset's product skips the
    output rows whose shifted input lies wholly in the zero padding (the top
    rows, for the causal offsets above the centre). Layers with few input
    values per output (in channels × free offsets ≤ ``UNFOLD_UP_TO``, as the
    first layer on 1 or 3 image channels) take one im2col (``F.unfold``) and
    one batched matmul instead: per-offset products there would be
    matrix-vector products; so does a 1×1 conv, whose input is its own im2col.
    With ``features_major`` the per-offset result is stored features-major (see
    the module's Layout note) instead of images-major.
    """
    mod = block.module
    ph, pw = mod.padding
    kh, kw = mod.kernel_size
    b, c_in, h_in, w_in = inp.shape
    c_out, h, w = delta.shape[1:]
    if block.cols is not None:
        if kh * kw == 1 and not (ph or pw):
            cols = inp.reshape(b, c_in, h * w)                               # a 1×1 conv: the input itself
        else:
            cols = F.unfold(inp, (kh, kw), padding=(ph, pw))                 # (B, Cin·kh·kw, H·W), rows (c, i, j)
        if block.cols.numel() < cols.shape[1]:
            cols = cols[:, block.cols]                                       # the free offsets' rows, (c, offset)
        g = torch.bmm(delta.reshape(b, c_out, h * w), cols.transpose(1, 2)).view(b, -1)
        return g if block.select is None else g[:, block.select]
    wq = w_in + pw      # row stride: W = W_in + 2p − kw + 1, so Δ gains kw − 1 − p zero columns, or, where
    # p ≥ kw, loses its last p − kw + 1 columns, whose windows read only padding (their gradient terms are 0)
    xp = inp.new_empty(b, h_in + 2 * ph + 1, wq, c_in)                       # padded and channels-last in one copy,
    xp[:, :ph].zero_()                                                       # each element written once
    xp[:, ph + h_in:].zero_()
    xp[:, ph:ph + h_in, :pw].zero_()
    xp[:, ph:ph + h_in, pw:].copy_(inp.permute(0, 2, 3, 1))
    xp = xp.view(b, -1, c_in)
    if wq == w:
        dp = _standard_strides(delta)
    else:
        dp = F.pad(delta, (0, wq - w)) if wq > w else delta[..., :wq].contiguous()
    dp = dp.flatten(2)                                                       # (B, Cout, H·Wq)
    out = torch.empty(len(block.offsets), b, c_out, c_in, dtype=delta.dtype, device=delta.device)
    for k, (i, j) in enumerate(block.offsets):
        y0, y1 = max(0, ph - i), min(h, h_in + ph - i)                       # rows reading some input
        if y1 <= y0:
            out[k].zero_()
            continue
        s = (i + y0) * wq + j
        torch.bmm(dp[:, :, y0 * wq:y1 * wq], xp[:, s:s + (y1 - y0) * wq], out=out[k])
    if features_major:                                                       # (Cout·Cin·K, B), see _runs
        g = _transposed(out.view(-1, c_out * c_in)).view(-1, b)
        return (g if block.select is None else g[block.select]).t()
    g = out.permute(1, 2, 3, 0).reshape(b, -1)                               # (B, Cout·Cin·K)
    return g if block.select is None else g[:, block.select]


def _pads(mod: nn.Module) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a Conv2d, as ``F.pad`` takes it ('same' may be uneven)."""
    pads = getattr(mod, "_reversed_padding_repeated_twice", None)
    if pads is None:
        ph, pw = mod.padding
        pads = (pw, pw, ph, ph)
    return tuple(int(p) for p in pads)


def _conv_grads(mod: nn.Conv2d, offsets, inp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-image weight gradients of a Conv2d at kernel ``offsets``: (B, Cout, Cin/groups, K).

    y[o, p] = Σ W[o, c, i, j] x_pad[c, s·p + d·(i, j)], so the gradient at offset (i, j) is
    Δ_b · X_b(i, j)ᵀ with X_b(i, j) = x_pad[:, d·i :: s, d·j :: s] cut to the output grid.
    """
    pads = _pads(mod)
    if any(pads):
        xp = F.pad(inp, pads, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    else:
        xp = inp
    b, c_out, h, w = delta.shape
    c_in, g = inp.shape[1], mod.groups
    (sh, sw), (dh, dw) = mod.stride, mod.dilation
    d = delta.reshape(b * g, c_out // g, h * w)
    out = torch.empty(len(offsets), b * g, c_out // g, c_in // g, dtype=delta.dtype, device=delta.device)
    for k, (i, j) in enumerate(offsets):
        xs = xp[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (w - 1) + 1:sw]
        torch.bmm(d, xs.reshape(b * g, c_in // g, h * w).transpose(1, 2), out=out[k])
    return out.view(len(offsets), b, c_out, c_in // g).permute(1, 2, 3, 0)


def _conv_transpose_grads(mod: nn.ConvTranspose2d, offsets, inp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-image weight gradients of a ConvTranspose2d at kernel ``offsets``: (B, Cin, Cout/groups, K).

    y[o, s·p + d·(i, j) − pad] += x[c, p] W[c, o, i, j], so the gradient at offset (i, j) is
    X_b · Δ_pad,b(i, j)ᵀ, Δ_pad the output gradient zero-padded by ``padding`` and
    Δ_pad,b(i, j) = Δ_pad[:, d·i :: s, d·j :: s] cut to the input grid (output_padding rows are
    never read: no weight reaches them).
    """
    b, c_in, h, w = inp.shape
    c_out, g = delta.shape[1], mod.groups
    (sh, sw), (dh, dw), (ph, pw) = mod.stride, mod.dilation, mod.padding
    dp = F.pad(delta, (pw, pw, ph, ph)) if ph or pw else delta
    x = inp.reshape(b * g, c_in // g, h * w)
    out = torch.empty(len(offsets), b * g, c_in // g, c_out // g, dtype=delta.dtype, device=delta.device)
    for k, (i, j) in enumerate(offsets):
        ds = dp[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (w - 1) + 1:sw]
        torch.bmm(x, ds.reshape(b * g, c_out // g, h * w).transpose(1, 2), out=out[k])
    return out.view(len(offsets), b, c_in, c_out // g).permute(1, 2, 3, 0)


def _grouped_grads(mod: nn.Module, shape, inp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-image weight gradients of a Conv2d / ConvTranspose2d as one grouped weight gradient:
    (B, *weight shape), in the weight's layout (all kernel offsets, so K = kh·kw in that order).

    Image b's channels become groups b·G … b·G+G−1 of a single-image convolution with B·G groups,
    whose weight gradient stacks the B per-image gradients (what torch.func does per sample).
    """
    b, transposed = inp.shape[0], isinstance(mod, nn.ConvTranspose2d)
    padding, output_padding = mod.padding, (0, 0)
    if transposed:                                        # from the shapes (forward's output_size may set it)
        (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
        least = ((inp.shape[2] - 1) * sh - 2 * padding[0] + dh * (kh - 1) + 1,
                 (inp.shape[3] - 1) * sw - 2 * padding[1] + dw * (kw - 1) + 1)
        output_padding = (delta.shape[2] - least[0], delta.shape[3] - least[1])
    elif isinstance(padding, str) or mod.padding_mode != "zeros":
        pads = _pads(mod)
        if any(pads):
            inp = F.pad(inp, pads, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
        padding = (0, 0)
    weight = delta.new_empty(1).expand(b * shape[0], *shape[1:])
    g = torch.ops.aten.convolution_backward(
        delta.reshape(1, -1, *delta.shape[2:]), inp.reshape(1, -1, *inp.shape[2:]), weight, None,
        mod.stride, padding, mod.dilation, transposed, output_padding, b * mod.groups, (False, True, False))[1]
    return g.view(b, shape[0], shape[1], -1)


def _linear_grads(inp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-image weight gradients of a Linear on (B, …, in): Σ_… Δ_bᵀ x_b, (B, out, in)."""
    b = inp.shape[0]
    return torch.bmm(delta.reshape(b, -1, delta.shape[-1]).transpose(1, 2), inp.reshape(b, -1, inp.shape[-1]))


def _bias_grads(layer: _Layer, delta: torch.Tensor) -> torch.Tensor:
    if layer.kind == "linear":
        return delta.reshape(delta.shape[0], -1, delta.shape[-1]).sum(1)
    return delta.sum((2, 3))


def _weight_norm_grads(gw: torch.Tensor, g: torch.Tensor, v: torch.Tensor, dim: int):
    """Chain rule of w = g·v/‖v‖ per image: (∂/∂g, ∂/∂v) from the weight gradients ``gw`` (B, *v.shape).

    n = ‖v‖ over every dimension but ``dim`` (all of them for dim = -1, as ``torch._weight_norm``),
    v̂ = v/n: ∂/∂g = Σ gw ⊙ v̂ and ∂/∂v = (g/n)(gw − (∂/∂g) v̂).
    Returns (B, g.numel()) and (B, v.numel()), each in its parameter's row-major order.
    """
    b = gw.shape[0]
    n = torch.norm_except_dim(v, 2, dim)
    if dim == -1:
        dim, rows = 0, 1
    else:
        dim %= v.dim()
        rows = v.shape[dim]
    vh = (v / n).movedim(dim, 0).reshape(rows, -1)
    c = (g / n).reshape(rows, 1)
    gm = gw.movedim(dim + 1, 1)
    gr = gm.reshape(b, rows, -1)
    dg = torch.einsum("brk,rk->br", gr, vh)                               # Σ gw ⊙ v̂ per entry of g
    dv = torch.addcmul(gr * c, (dg * c.squeeze(1)).unsqueeze(2), vh, value=-1)
    if dim:
        dv = dv.view(gm.shape).movedim(1, dim + 1)
    return dg, dv.reshape(b, -1)


def _fits(layer: _Layer, inp, out, b: int) -> bool:
    """Whether one recorded call has the shapes this layer's rule implies (batch dim 0 of size b)."""
    mod = layer.module
    if not (isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor)) or inp.dim() < 2 or out.dim() < 2:
        return False
    if inp.shape[0] != b or out.shape[0] != b:
        return False
    if layer.kind == "linear":
        return inp.shape[-1] == mod.in_features and out.shape == inp.shape[:-1] + (mod.out_features,)
    if inp.dim() != 4 or out.dim() != 4 or inp.shape[1] != mod.in_channels or out.shape[1] != mod.out_channels:
        return False
    (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
    if layer.kind == "conv_transpose2d":
        (ph, pw), extra = mod.padding, (max(sh, dh) - 1, max(sw, dw) - 1)
        least = ((inp.shape[2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1,
                 (inp.shape[3] - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
        return all(lo <= n <= lo + e for lo, n, e in zip(least, out.shape[2:], extra))
    left, right, top, bottom = _pads(mod)
    if layer.kind == "conv2d/stride1" and (left, top) != (right, bottom):
        return False
    hp, wp = inp.shape[2] + top + bottom, inp.shape[3] + left + right
    return tuple(out.shape[2:]) == ((hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1)


def _add(acc, t):
    return t if acc is None else acc + t


def _layer_blocks(layer: _Layer, plan: _Plan, calls, b: int):
    """(feature offset, (B, n_free)) for each parameter of one layer, from its calls' (input, Δ)."""
    mod, names = layer.module, {r: n for n, r in layer.params}
    weight = bias = None
    for inp, delta in calls:
        if layer.kind == "conv2d/stride1":
            block = layer.block
            if block.grouped_from is not None and delta.shape[2] * delta.shape[3] >= block.grouped_from:
                g = _grouped_grads(mod, plan.masks[names["weight"]].shape, inp, delta).reshape(b, -1)
                weight = _add(weight, g if block.select is None else g[:, block.select])
            else:
                weight = _add(weight, _weight_grads(block, inp, delta, features_major=plan.features_major))
        elif layer.grouped:
            shape = plan.masks[names["weight" if layer.norm is None else "v"]].shape
            weight = _add(weight, _grouped_grads(mod, shape, inp, delta))
        elif layer.kind == "conv2d":
            weight = _add(weight, _conv_grads(mod, layer.offsets, inp, delta))
        elif layer.kind == "conv_transpose2d":
            weight = _add(weight, _conv_transpose_grads(mod, layer.offsets, inp, delta))
        else:
            weight = _add(weight, _linear_grads(inp, delta))
        if "bias" in names:
            bias = _add(bias, _bias_grads(layer, delta))
    out = {}
    if "bias" in names:
        out["bias"] = bias if bias is not None else mod.bias.new_zeros(b, mod.bias.numel())
    if layer.norm is None:
        if weight is None:                      # never called
            mask = plan.masks[names["weight"]]
            out["weight"] = mask.new_zeros(b, int(mask.sum()), dtype=plan.params[names["weight"]].dtype)
        elif layer.kind == "conv2d/stride1":
            out["weight"] = weight
        else:
            weight = weight.reshape(b, -1)
            out["weight"] = weight if layer.select is None else weight[:, layer.select]
    else:
        g, v = plan.params[names["g"]].detach(), plan.params[names["v"]].detach()
        if weight is None:
            gw = torch.zeros(b, *v.shape, dtype=v.dtype, device=v.device)
        elif layer.kind == "linear":
            gw = weight
        else:
            kh, kw = v.shape[2:]
            if len(layer.offsets) < kh * kw:
                full = weight.new_zeros(*weight.shape[:3], kh * kw)
                full[..., [i * kw + j for i, j in layer.offsets]] = weight
                weight = full
            gw = weight.reshape(b, *v.shape)
        mask = getattr(mod, "mask", None)
        if isinstance(mask, torch.Tensor) and mask.shape == v.shape:
            gw = gw * mask
        out["g"], out["v"] = _weight_norm_grads(gw, g, v, layer.norm_dim)
    for name, role in layer.params:
        block = _select(out[role], plan.masks[name]) if role != "weight" else out[role]
        if block.shape[1]:
            yield plan.offsets[name], block


def _recorder(plan: _Plan, saved: dict):
    def hook(mod, args, kwargs, out):
        inp = args[0] if args else kwargs.get("input")
        if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor):
            saved.setdefault(mod, []).append((inp, out, None, None))
            return None
        fresh = None
        if not out.requires_grad and torch.is_grad_enabled():   # frozen layer on a constant input: Δ still exists
            out = fresh = out.detach().requires_grad_()
        if mod in plan.copy_io:                # changed in place later: keep copies, hand on a fresh output
            saved.setdefault(mod, []).append((inp.detach().clone(), out, None, None))
            return out.clone()
        saved.setdefault(mod, []).append((inp.detach(), out, inp._version, out._version))
        return fresh
    return hook


def _changed(call) -> bool:
    inp, out, v_in, v_out = call
    return v_in is not None and (inp._version != v_in or out._version != v_out)


def _blocks(model: nn.Module, plan: _Plan, x: torch.Tensor):
    """Yield (feature offset, per-image gradient block) for one chunk, layer by layer."""
    b = x.shape[0]
    saved, logp = {}, None
    while plan.layers:
        saved = {}
        hook = _recorder(plan, saved)
        handles = [layer.module.register_forward_hook(hook, with_kwargs=True) for layer in plan.layers]
        try:
            with torch.enable_grad():
                logp = model.log_prob(x).sum()
        finally:
            for h in handles:
                h.remove()
        retry = False
        for layer in list(plan.layers):
            calls = saved.get(layer.module, [])
            if not all(_fits(layer, c[0], c[1], b) for c in calls):
                plan.demote(layer)                    # this call breaks the rule's assumptions: vmap it
                retry = True
            elif any(_changed(c) for c in calls):
                plan.copy_io.add(layer.module)
                retry = True
        if not retry:
            break
    if plan.layers:
        calls = [(layer, c) for layer in plan.layers for c in saved.get(layer.module, [])]
        outs = [c[1] for _, c in calls if c[1].requires_grad]
        grads = iter(torch.autograd.grad(logp, outs, allow_unused=True) if outs else ())
        del outs, logp
        per_layer = {}
        for layer, (inp, out, _, _) in calls:
            delta = next(grads) if out.requires_grad else None
            per_layer.setdefault(layer, []).append((inp, torch.zeros_like(out) if delta is None else delta))
        del calls, saved
        for layer in plan.layers:
            yield from _layer_blocks(layer, plan, per_layer.pop(layer, []), b)
    if plan.fallback:
        g = _func_grads(model, plan.fallback, x)
        for name in plan.fallback:
            block = _select(g.pop(name), plan.masks[name])
            if block.shape[1]:
                yield plan.offsets[name], block


def score_plan(model: nn.Module, x: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """(parameter name, rule) for every parameter, in feature order; rule ``"vmap"`` is the fallback.

    With example images ``x`` the plan is run once on them, so a layer whose calls break its
    rule's assumptions shows the ``vmap`` it takes in :func:`fisher_scores`.
    """
    model.eval()
    plan = _plan(model)
    if x is not None:
        for _ in _blocks(model, plan, _standard_strides(x)):
            pass
    return plan.rules()


def _standard_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with plain row-major strides. A 1-channel NHWC→NCHW permute is 'contiguous' but
    keeps channels-last strides, which makes oneDNN pick another conv algorithm (other round-off)."""
    if x.stride() == torch.empty(x.shape, device="meta").stride():
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _features_major(g: torch.Tensor) -> bool:
    """Whether a block (B × m) is stored features-major: each feature's B values side by side."""
    return not g.is_contiguous() and g.t().is_contiguous()


def _transposed(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.t()`` copied into ``out`` (default: new and contiguous); on the CPU a tiled transpose in C."""
    return native.transposed(x, torch.get_num_threads(), out)


def _joined(blocks: list[torch.Tensor], features_major: bool) -> torch.Tensor:
    """Blocks (B × m_i) side by side, (B × Σ m_i), stored features-major or images-major: each block is copied
    as it is stored or transposed in one pass."""
    b, at = blocks[0].shape[0], 0
    out = blocks[0].new_empty(sum(g.shape[1] for g in blocks), b) if features_major else \
        blocks[0].new_empty(b, sum(g.shape[1] for g in blocks)).t()
    for g in blocks:                              # out is viewed features-major (Σ m_i × B) here
        part, at = out[at:at + g.shape[1]], at + g.shape[1]
        if _features_major(g) == features_major:
            part.copy_(g.t())
        elif features_major:
            _transposed(g, part)
        else:
            _transposed(g.t(), part.t())
    return out.t()


def _runs(blocks, width: int | None = None):
    """One chunk's (offset, block) pairs with runs of adjacent narrow blocks joined into one block of at least
    ``width`` features (the last run may be narrower), stored the way most of its features are
    (:func:`_joined`); a block at least ``width`` wide goes alone, uncopied. The runs depend only on the
    sequence of blocks (the model's layers), never on the images or the projections, so every chunk of
    every batch is projected in the same pieces."""
    width = width or RUN_FEATURES
    run, start, size = [], 0, 0

    def joined():
        if len(run) == 1:
            return start, run[0]
        return start, _joined(run, 2 * sum(g.shape[1] for g in run if _features_major(g)) > size)

    for offset, g in blocks:
        if run and (offset != start + size or size >= width or g.shape[1] >= width):
            yield joined()
            run = []
        if g.shape[1] >= width:
            yield offset, g
            continue
        if not run:
            start, size = offset, 0
        run.append(g)
        size += g.shape[1]
    if run:
        yield joined()


def _project(stack: ProjectionStack, blocks) -> list[torch.Tensor]:
    """The (dim × chunk) sums of one chunk's (offset, block) pairs, run by run (:func:`_runs`)."""
    zs = None
    for offset, g in _runs(blocks):
        zs = stack.accumulate(zs, g, offset)
    return zs


def _chunks_per_group(stack: ProjectionStack | None, x: torch.Tensor, chunk_size: int, n: int) -> int:
    """How many chunks to project together: on the CPU, a stack with dense members expands each of their
    blocks once per group (the expansion costs about what the block's product does; each non-zero of its
    sparse members is applied to the whole group in one pass too), so several chunks' scores are held at
    once, up to ``GROUP_BYTES``. Sparse-only stacks gain little from it and keep one chunk's memory."""
    if stack is None or not stack.uses_cpu_kernels(x) or not stack._dense:
        return 1
    return int(max(1, min(-(-x.shape[0] // chunk_size), GROUP_BYTES // max(1, 4 * chunk_size * n))))


def default_chunk(n_features: int) -> int:
    """Images per gradient pass when none is given: ``DEFAULT_CHUNK`` (64) for a prior of up to
    ``SMALL_PRIOR_FEATURES`` (2 M) features, half that above. A small prior's pass is many small operations,
    cheaper per image in bigger chunks (the builtin CelebA Pyramid, 290 k features: scores + projection
    1.53x -> 1.35x a training step at 64 rather than 32); a large one's is bound by memory traffic, which
    bigger chunks make worse (the paper-size Pyramid, 20.7 M features: 1.28x at 32, 1.46x at 64)."""
    return DEFAULT_CHUNK if n_features <= SMALL_PRIOR_FEATURES else DEFAULT_CHUNK // 2


def fisher_scores(model: nn.Module, x: torch.Tensor,
                  projection: SparseProjection | list[SparseProjection] | ProjectionStack | None = None,
                  chunk_size: int | None = None):
    """Exact per-image Fisher scores ∇_θ log p_θ(x).

    Returns ``Tensor[B, n_features]`` without a projection, ``Tensor[B, dim]``
    with one, or a list of those with a list of projections or a
    :class:`~fisher.projection.ProjectionStack` (all computed from the same
    gradient pass; pass the same stack for every batch, so that what it caches
    on a GPU is built once).

    Images are processed ``chunk_size`` at a time (default :func:`default_chunk`); with a projection the last
    chunk is padded to full size, so every product has the same shapes and an
    image's embedding is bitwise identical whatever the batch it came in
    (for a given ``chunk_size``; keep it a multiple of 16 so SIMD lanes align).
    """
    model.eval()
    x = _standard_strides(x)
    single = isinstance(projection, SparseProjection)
    if single:
        if projection._stack is None:
            projection._stack = ProjectionStack([projection])
        stack = projection._stack
    elif isinstance(projection, ProjectionStack):
        stack = projection
    else:
        stack = ProjectionStack(list(projection)) if projection else None
    projs = stack.projections if stack is not None else []
    plan = _plan(model)
    # features-major blocks where the transpose is cheap: the C library's (CPU) or the device's own
    plan.features_major = stack is not None and (x.device.type != "cpu" or native.kernels() is not None)
    n = plan.n_features
    if chunk_size is None:
        chunk_size = default_chunk(n)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (or None for default_chunk)")
    for p in projs:
        if p.n_features != n:
            from fisher.io import FisherError
            raise FisherError(f"projection was built for {p.n_features} features, the prior has {n}")
    results = []
    group = _chunks_per_group(stack, x, chunk_size, n if stack is not None else 0)
    for start in range(0, x.shape[0], chunk_size * group):
        chunks = []
        for c in range(start, min(start + chunk_size * group, x.shape[0]), chunk_size):
            xc = x[c:c + chunk_size]
            rows = xc.shape[0]
            if stack is not None and rows < chunk_size:      # fixed shapes: bitwise batch-size invariance
                xc = torch.cat([xc, xc[:1].expand(chunk_size - rows, *xc.shape[1:])])
            chunks.append((xc, rows))
        if stack is None:
            for xc, rows in chunks:
                parts = dict(_blocks(model, plan, xc))
                results.append(torch.cat([parts[k] for k in sorted(parts)], dim=1) if parts else torch.zeros(rows, 0, device=x.device))
            continue
        if len(chunks) == 1:                      # blocks projected as they are produced
            zs = _project(stack, _blocks(model, plan, chunks[0][0]))
        else:                                     # every chunk's blocks first, then each block for all of them
            blocks = [list(_runs(_blocks(model, plan, xc))) for xc, _ in chunks]
            zs = None
            if all([o for o, _ in b] == [o for o, _ in blocks[0]] for b in blocks):
                for k, (offset, _) in enumerate(blocks[0]):
                    zs = stack.accumulate_chunks(zs, [b[k][1] for b in blocks], offset)   # (dim × chunks·chunk)
            else:                                 # a layer left its rule in a later chunk: one chunk at a time
                zs = [torch.cat(parts, 1) for parts in zip(*(_project(stack, b) for b in blocks))]
            del blocks
        results += [[z[:, c * chunk_size:c * chunk_size + rows].t() for z in zs] for c, (_, rows) in enumerate(chunks)]
    if stack is None:
        return torch.cat(results) if results else torch.zeros(0, n, device=x.device)
    out = [torch.cat([r[i] for r in results]) for i in range(len(projs))]
    return out[0] if single else out
