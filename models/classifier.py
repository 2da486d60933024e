"""A small pre-activation ResNet classifier for the real data.

Used to score class-conditional samples (does a generated "cat" classify as a cat?)
and as an offline feature network (pooled penultimate features) for Fréchet
distance, KID and memorization checks when the FID Inception weights are unavailable.
Network only: training lives elsewhere.
"""

import math

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # up to 32 groups that divide the channels
    raise ValueError(f"unknown norm {kind!r}; use 'batch' or 'group'")


class PreActBlock(nn.Module):
    """norm-act-conv twice, plus a (projected) shortcut; He et al. 2016 "identity mappings"."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.norm1 = _norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.act = nn.SiLU()
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(x))
        # The projection takes the pre-activated input, as in the pre-activation ResNet.
        skip = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        h = self.conv2(self.act(self.norm2(h)))
        return h + skip


class ImageClassifier(nn.Module):
    """Pre-activation ResNet: stem, 3 stages (widths w, 2w, 4w) of `blocks_per_stage` blocks,
    global average pool, dropout, linear head. Input: float images in [-1, 1]."""

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        width: int = 64,
        dropout: float = 0.1,
        norm: str = "batch",
        blocks_per_stage: int = 2,
    ):
        super().__init__()
        # 64x64 (and larger) inputs are halved by the stem so every size runs the 32x32 body.
        stem_stride = 1 if image_size <= 32 else 2
        self.stem = nn.Conv2d(3, width, 3, stem_stride, 1, bias=False)
        stage_widths = [width, 2 * width, 4 * width]
        blocks = []
        in_channels = width
        for stage, out_channels in enumerate(stage_widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(PreActBlock(in_channels, out_channels, stride, norm))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = _norm(norm, in_channels)
        self.act = nn.SiLU()
        self.feature_dim = in_channels
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [B, feature_dim]."""
        h = self.blocks(self.stem(x))
        h = self.act(self.final_norm(h))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
