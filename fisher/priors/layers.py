"""Masked convolutions of autoregressive priors (van den Oord et al. 2016, PixelRNN/PixelCNN sec. 3.4).

Pixels above, and left in the same row, are visible. At the centre pixel, feature maps are split
into ``channels`` colour groups: an output in group g sees input groups < g (mask A, the first
layer) or <= g (mask B, later layers), which gives the R→G→B order within a pixel. The mask is a
buffer rebuilt from the architecture, applied as ``conv(x, w * mask)``; ``w`` is never edited.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _group(index: int, total: int, channels: int) -> int:
    """Colour group (0=R, 1=G, 2=B) of feature map ``index`` out of ``total``."""
    return index * channels // total


def causal_mask(out_ch: int, in_ch: int, k: int, mask_type: str, channels: int) -> torch.Tensor:
    """Mask of shape (out, in, k, k): 1 where a weight is free, 0 where it is pinned."""
    mask = torch.zeros(out_ch, in_ch, k, k)
    c = k // 2
    mask[:, :, :c, :] = 1
    mask[:, :, c, :c] = 1
    go = torch.arange(out_ch)[:, None] * channels // out_ch          # _group of every output / input map
    gi = torch.arange(in_ch)[None, :] * channels // in_ch
    mask[:, :, c, c] = ((gi < go) | ((gi == go) if mask_type == "B" else False)).to(mask.dtype)
    return mask


class MaskedConv2d(nn.Conv2d):
    """Conv2d computing ``conv(x, weight * mask)`` with 'same' padding."""

    def __init__(self, in_ch: int, out_ch: int, k: int, mask_type: str, channels: int):
        super().__init__(in_ch, out_ch, k, padding=k // 2)
        self.register_buffer("mask", causal_mask(out_ch, in_ch, k, mask_type, channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)
