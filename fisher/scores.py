"""Fisher scores ∇_θ log p_θ(x), exact per image (paper sec. 3.2 and 4.1).

The score of image x is the gradient of log p_θ(x) (not of the NLL) with
respect to every *free* parameter of the prior, in eval mode, in float32.
Weights pinned to zero by a causal mask have exactly-zero gradients and are
left out, so ``n_features`` counts only free entries. Features are ordered
as ``model.named_parameters()``, each parameter's free entries in row-major
order.

Fast path (every parameter belongs to a stride-1 ``nn.Conv2d``, such as the
PixelCNN): one forward pass, one backward pass to the conv *outputs* only
(no summed weight gradients), then each layer's per-image weight gradients
as batched matmuls of the output gradients with the shifted inputs at the
kernel offsets the mask leaves free (about half of a 7×7 kernel), read as
strided views without copying patches. Per-layer
blocks are projected as they are produced, and the batch is processed in
chunks, so memory does not grow with the batch size when a projection is
given. Other models fall back to ``torch.func`` (vmap of grad).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.projection import ProjectionStack, SparseProjection

DEFAULT_CHUNK = 32


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
    from torch.func import grad, vmap
    model.eval()
    masks = free_masks(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    g = vmap(grad(lambda p, xi: _log_prob_functional(model, p, buffers, xi.unsqueeze(0))), in_dims=(None, 0))(params, x)
    return torch.cat([g[n][:, masks[n]] for n in params], dim=1)


def _log_prob_functional(model, params, buffers, x):
    from torch.func import functional_call
    logits = functional_call(model, (params, buffers), (x,))
    return model.log_prob_from_logits(logits, x).sum()


# ---------------------------------------------------------------- fast path
@dataclass
class _ConvBlock:
    module: nn.Conv2d
    offsets: list[tuple[int, int]]       # kernel positions with any free weight
    select: torch.Tensor | None          # free entries within (out, in, offsets); None = all of them
    n_weight: int
    w_offset: int                        # feature offset of the weight block
    b_offset: int | None                 # feature offset of the bias block


def _conv_plan(model: nn.Module) -> list[_ConvBlock] | None:
    """Per-layer layout for the fast path, or None when a parameter is outside a plain Conv2d."""
    masks = free_masks(model)
    convs = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and list(mod.parameters(recurse=False)):
            if mod.stride != (1, 1) or mod.dilation != (1, 1) or mod.groups != 1 or not isinstance(mod.padding, tuple):
                return None
            convs[name] = mod
    plan, offset, by_name = [], 0, {}
    for pname, p in model.named_parameters():
        mod_name, _, kind = pname.rpartition(".")
        if mod_name not in convs:
            return None
        mod, mask = convs[mod_name], masks[pname]
        if kind == "weight":
            kh, kw = mod.kernel_size
            used = mask.any(0).any(0)                                    # (kh, kw)
            offsets = [(i, j) for i in range(kh) for j in range(kw) if used[i, j]]
            idx = torch.tensor([i * kw + j for i, j in offsets])
            sub = mask.flatten(2)[:, :, idx].flatten()                   # free flags over (out, in, offsets)
            select = None if bool(sub.all()) else sub.nonzero().squeeze(1)
            block = _ConvBlock(mod, offsets, select, int(mask.sum()), offset, None)
            by_name[mod_name] = block
            plan.append(block)
        elif kind == "bias":
            if mod_name not in by_name:
                return None
            by_name[mod_name].b_offset = offset
        else:
            return None
        offset += int(mask.sum())
    return plan


def _weight_grads(block: _ConvBlock, inp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-image gradients of the free weights of one conv: (B, n_free).

    For kernel offset (i, j) the gradient is Δ_b · X_b(i, j)ᵀ, where X_b(i, j)
    is the padded input shifted by (i, j). With the input channels-last and
    the output grid widened to the padded width, each shifted input is a
    plain strided view of the same buffer, so no patches are copied: one
    batched matmul per free offset, on a grid (W+2p)/W wider than needed.
    """
    mod = block.module
    ph, pw = mod.padding
    b, c_in, h_in, w_in = inp.shape
    h, w = delta.shape[2:]
    wp = w_in + 2 * pw
    xp = F.pad(inp, (pw, pw, ph, ph + 1)).permute(0, 2, 3, 1).contiguous().view(b, -1, c_in)
    dp = F.pad(delta, (0, wp - w)).flatten(2)                                  # (B, Cout, H*Wp)
    out = torch.empty(len(block.offsets), b, delta.shape[1], c_in, dtype=delta.dtype, device=delta.device)
    for k, (i, j) in enumerate(block.offsets):
        s = i * wp + j
        torch.bmm(dp, xp[:, s:s + h * wp], out=out[k])
    g = out.permute(1, 2, 3, 0).reshape(b, -1)                                 # (B, Cout*Cin*K)
    return g if block.select is None else g[:, block.select]


def _blocks(model: nn.Module, plan: list[_ConvBlock], x: torch.Tensor):
    """Yield (feature offset, per-image gradient block) for one chunk, layer by layer."""
    saved = {}

    def hook(mod, args, out):
        saved[mod] = (args[0].detach(), out)

    handles = [b.module.register_forward_hook(hook) for b in plan]
    try:
        logp = model.log_prob(x)
    finally:
        for h in handles:
            h.remove()
    outs = [saved[b.module][1] for b in plan]
    deltas = torch.autograd.grad(logp.sum(), outs)
    del outs
    for block, delta in zip(plan, deltas):
        inp = saved.pop(block.module)[0]
        yield block.w_offset, _weight_grads(block, inp, delta)
        if block.b_offset is not None:
            yield block.b_offset, delta.sum((2, 3))


def _standard_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with plain row-major strides. A 1-channel NHWC→NCHW permute is 'contiguous' but
    keeps channels-last strides, which makes oneDNN pick another conv algorithm (other round-off)."""
    if x.stride() == torch.empty(x.shape, device="meta").stride():
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def fisher_scores(model: nn.Module, x: torch.Tensor,
                  projection: SparseProjection | list[SparseProjection] | None = None,
                  chunk_size: int = DEFAULT_CHUNK):
    """Exact per-image Fisher scores ∇_θ log p_θ(x).

    Returns ``Tensor[B, n_features]`` without a projection, ``Tensor[B, dim]``
    with one, or a list of those with a list of projections (all computed
    from the same gradient pass).

    Images are processed ``chunk_size`` at a time; with a projection the last
    chunk is padded to full size, so every product has the same shapes and an
    image's embedding is bitwise identical whatever the batch it came in
    (for a given ``chunk_size``; keep it a multiple of 16 so SIMD lanes align).
    """
    model.eval()
    x = _standard_strides(x)
    single = isinstance(projection, SparseProjection)
    projs = [projection] if single else list(projection or [])
    for p in projs:
        if p.n_features != n_features(model):
            from fisher.io import FisherError
            raise FisherError(f"projection was built for {p.n_features} features, the prior has {n_features(model)}")
    plan = _conv_plan(model)
    stack = ProjectionStack(projs) if projs else None
    results = []
    for start in range(0, x.shape[0], chunk_size):
        xc = x[start:start + chunk_size]
        rows = xc.shape[0]
        if stack is not None and rows < chunk_size:      # fixed shapes: bitwise batch-size invariance
            xc = torch.cat([xc, xc[:1].expand(chunk_size - rows, *xc.shape[1:])])
        if plan is None:
            blocks = [(0, fisher_scores_vmap(model, xc))]
        else:
            blocks = _blocks(model, plan, xc)
        if stack is None:
            parts = dict(blocks)
            results.append(torch.cat([parts[k] for k in sorted(parts)], dim=1))
            continue
        zs = None
        for offset, g in blocks:
            contrib = stack.project(g, offset)
            zs = contrib if zs is None else [a + b for a, b in zip(zs, contrib)]
        results.append([z[:rows] for z in zs])
    if stack is None:
        return torch.cat(results) if results else torch.zeros(0, n_features(model))
    out = [torch.cat([r[i] for r in results]) for i in range(len(projs))]
    return out[0] if single else out
