"""Class- and time-conditioned UNet. One implementation serves the latent denoiser (small
maps, attention at every level) and the pixel UNets with and without self-attention."""
import torch
from torch import nn

from models.blocks import ConditionEmbedding, Downsample, ResBlock, SelfAttention2d, Upsample, make_norm


class UNet(nn.Module):
    def __init__(self, in_channels, image_size, num_classes, base_channels=64, channel_mults=(1, 2, 2),
                 num_res_blocks=2, attention_resolutions=(16, 8), num_heads=4, dropout=0.1,
                 time_embed_dim=None, out_channels=None):
        super().__init__()
        emb_dim = 4 * base_channels
        self.num_classes = num_classes
        self.embed = ConditionEmbedding(num_classes, emb_dim, time_embed_dim or base_channels)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # attention_resolutions: feature-map sides with attention; one no level has is passed over
        def level_layer(ch_in, ch_out, res):
            block = ResBlock(ch_in, ch_out, emb_dim, dropout)
            attn = SelfAttention2d(ch_out, num_heads) if res in attention_resolutions else nn.Identity()
            return nn.ModuleList([block, attn])

        self.down, skip_channels = nn.ModuleList(), [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(level_layer(ch, base_channels * mult, res))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                res //= 2

        # The simple UNet (no attention_resolutions) has no attention anywhere, the middle included.
        mid_attn = SelfAttention2d(ch, num_heads) if attention_resolutions else nn.Identity()
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), mid_attn, ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(level_layer(ch + skip_channels.pop(), base_channels * mult, res))
                ch = base_channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.norm_out = make_norm("group", ch)
        self.conv_out = nn.Conv2d(ch, out_channels or in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start as the zero predictor: stable early training
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y):
        emb = self.embed(t, y)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer[1](layer[0](h, emb))
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), emb))
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
