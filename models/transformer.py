"""Diffusion transformer, on pixels (the S2 system) or on the VAE's latents (as DiT runs it): ViT
patches, fixed 2-D sin-cos positions, adaLN-Zero conditioned blocks (DiT, Peebles & Xie 2023) with
linear or softmax attention, and a small residual conv decoder after un-patchifying that smooths
the seams between patches."""
import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import ConditionEmbedding, ResBlock, make_norm

ATTENTION_KINDS = ("linear", "softmax")


def sincos_position_embedding(width, grid_size):
    """Fixed 2-D sin-cos positions [grid_size^2, width] in row-major token order: half the
    channels encode the row, half the column, each as 1-D sin-cos (as in MAE)."""
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for a 2-D sin-cos embedding")
    quarter = width // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions):
        angles = positions.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def linear_attention(q, k, v, eps=1e-6):
    """Katharopoulos et al. (2020) attention with the feature map phi(x) = elu(x) + 1, O(N) in
    tokens: phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1). q, k, v: [B, heads, N, head_dim].
    Computed in at least float32 with autocast off: the sums over N tokens lose too much in bf16."""
    in_dtype, dtype = v.dtype, torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = F.elu(q.to(dtype)) + 1, F.elu(k.to(dtype)) + 1, v.to(dtype)
        kv = k.transpose(-1, -2) @ v                                   # phi(K)^T V: [B, heads, d, d]
        normalizer = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)  # phi(Q) phi(K)^T 1: [B, heads, N, 1]
        out = (q @ kv) / normalizer.clamp_min(eps)
    return out.to(in_dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, width, heads, kind):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {kind!r}; choose from {', '.join(ATTENTION_KINDS)}")
        if width % heads:
            raise ValueError(f"width {width} does not split into {heads} heads")
        self.heads, self.kind = heads, kind
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.kind == "linear":
            out = linear_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP, each branch shifted, scaled and gated from the condition
    (adaLN-Zero: the modulation starts at zero, so every block starts as the identity)."""

    def __init__(self, width, heads, attention, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)  # adaLN supplies the affine
        self.attention = MultiHeadAttention(width, heads, attention)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cond):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.attention(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiffusionTransformer(nn.Module):
    """forward(x [B, C, H, W], t [B], y [B]) -> [B, C, H, W]; label num_classes is the null class."""

    def __init__(self, in_channels, image_size, num_classes, width=256, depth=8, heads=4, patch_size=2,
                 attention="linear", mlp_ratio=4.0, dropout=0.0, time_embed_dim=None, decoder_channels=64):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.num_classes, self.patch_size = num_classes, patch_size
        self.grid_size, self.decoder_channels = image_size // patch_size, decoder_channels
        self.embed = ConditionEmbedding(num_classes, width, time_embed_dim or width)
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.register_buffer("position", sincos_position_embedding(width, self.grid_size), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, attention, mlp_ratio, dropout)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.token_to_patch = nn.Linear(width, patch_size * patch_size * decoder_channels)
        self.decoder = nn.ModuleList(ResBlock(decoder_channels, decoder_channels, width, dropout)
                                     for _ in range(2))
        self.norm_out = make_norm("group", decoder_channels)
        self.conv_out = nn.Conv2d(decoder_channels, in_channels, 3, padding=1)
        self.initialize()

    def initialize(self):
        for module in list(self.blocks.modules()) + [self.token_to_patch]:
            if isinstance(module, nn.Linear):  # DiT's init for the transformer's linear layers
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # adaLN-Zero: blocks start as the identity; the zero output conv makes the whole network
        # start as the zero predictor, as the UNet does.
        for layer in [block.modulation[-1] for block in self.blocks] + [self.final_modulation[-1], self.conv_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, num_classes, in_channels, image_size):
        """Config fields the config does not have (yet) keep the constructor's defaults."""
        fields = {"width": "transformer_width", "depth": "transformer_depth", "heads": "transformer_heads",
                  "patch_size": "patch_size", "attention": "attention", "mlp_ratio": "mlp_ratio",
                  "dropout": "dropout", "time_embed_dim": "time_embed_dim",
                  "decoder_channels": "transformer_decoder_channels"}
        kwargs = {arg: getattr(cfg, field) for arg, field in fields.items() if hasattr(cfg, field)}
        return cls(in_channels, image_size, num_classes, **kwargs)

    def unpatchify(self, tokens):
        """[B, N, p*p*C] tokens in row-major order -> [B, C, H, W]."""
        b, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.decoder_channels
        return tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x, t, y):
        cond = self.embed(t, y)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position  # [B, N, width]
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        h = self.unpatchify(self.token_to_patch(modulate(self.final_norm(h), shift, scale)))
        for block in self.decoder:
            h = block(h, cond)
        return self.conv_out(F.silu(self.norm_out(h)))
