"""Building blocks shared by the VAE, the UNets and the discriminator."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a conv map (not over H, W: that would be
    InstanceNorm)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def group_count(channels):
    """GroupNorm groups: up to 32 of at least 4 channels each, cut to a divisor of the width (a
    UNet of width 48 concatenates 144-channel skips)."""
    return math.gcd(min(32, channels // 4) if channels >= 8 else 1, channels)


def make_norm(kind, channels):
    if kind == "layer":
        return LayerNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"unknown norm {kind!r}")


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: reweight channels from their global average."""

    def __init__(self, channels, reduction=8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x):
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        return x * weights[:, :, None, None]


class SpatialAttention(nn.Module):
    """Reweight pixels from a 7x7 conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class ResBlock(nn.Module):
    """Pre-activation residual block; optional conditioning embedding (scale and shift of the
    second norm) and optional channel + spatial attention on the residual branch."""

    def __init__(self, in_channels, out_channels, emb_dim=None, dropout=0.0, norm="group",
                 conv_attention=False):
        super().__init__()
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.norm2 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.attention = (nn.Sequential(ChannelAttention(out_channels), SpatialAttention())
                          if conv_attention else nn.Identity())
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + self.attention(h)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (through PyTorch's
    scaled_dot_product_attention, which picks a fused kernel on GPUs)."""

    def __init__(self, channels, num_heads=4, norm="group"):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = make_norm(norm, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        # each [B, heads, HW, head_dim], made dense: the fused kernels need the last dim's stride 1
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ConditionEmbedding(nn.Module):
    """Time (sinusoidal + MLP) plus a learned class embedding. Label `num_classes` is the
    null class that classifier-free guidance uses for the unconditional branch."""

    def __init__(self, num_classes, emb_dim, time_dim):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.num_classes = num_classes

    def forward(self, t, y):
        return self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_emb(y)
