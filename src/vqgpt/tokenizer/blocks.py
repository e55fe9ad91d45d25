"""Convolutional building blocks of the VQ-VAE encoder and decoder (taming-transformers style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with as many groups as divide `channels` (at most `groups`)."""
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions (used at the lowest resolution)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv halving the resolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, optional attention, ResnetBlock: the bottleneck of encoder and decoder."""

    def __init__(self, ch: int, groups: int, attention: bool, dropout: float):
        super().__init__()
        self.res1 = ResnetBlock(ch, ch, groups, dropout)
        self.attn = AttnBlock(ch, groups) if attention else nn.Identity()
        self.res2 = ResnetBlock(ch, ch, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))
