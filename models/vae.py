"""The attention VAE: residual blocks with channel and spatial attention, channel-wise
LayerNorm, Swish (SiLU), self-attention at the bottleneck, a spatial latent and a classifier
head on that latent. block_attention=False keeps only the bottleneck self-attention (a third
faster per step on CPUs)."""
import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import Downsample, LayerNorm2d, ResBlock, SelfAttention2d, Upsample, group_count


class AttentionVAE(nn.Module):
    def __init__(self, in_channels=3, image_size=32, num_classes=2, base_channels=64,
                 channel_mults=(1, 2, 2), num_res_blocks=1, latent_channels=4, classifier_hidden=256,
                 block_attention=True):
        super().__init__()
        self.latent_channels = latent_channels
        self.latent_size = image_size // 2 ** (len(channel_mults) - 1)
        widths = [base_channels * m for m in channel_mults]

        def res(ch_in, ch_out):
            return ResBlock(ch_in, ch_out, norm="layer", conv_attention=block_attention)

        enc = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(res(ch, width))
                ch = width
            if level < len(widths) - 1:
                enc.append(Downsample(ch))
        enc += [res(ch, ch), SelfAttention2d(ch, norm="layer"), res(ch, ch),
                LayerNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec = [nn.Conv2d(latent_channels, ch, 3, padding=1), res(ch, ch),
               SelfAttention2d(ch, norm="layer"), res(ch, ch)]
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                dec.append(res(ch, width))
                ch = width
            if level > 0:
                dec.append(Upsample(ch))
        dec += [LayerNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

        latent_dim = latent_channels * self.latent_size ** 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(latent_dim, classifier_hidden), nn.SiLU(),
                                        nn.Dropout(0.1), nn.Linear(classifier_hidden, num_classes))

    def encode(self, x):
        """Image in [-1, 1] -> (mean, logvar) of the latent posterior, each [B, C, h, w]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)

    def classify(self, z):
        return self.classifier(z)

    def forward(self, x, sample=True):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z), mean, logvar, z


class PatchDiscriminator(nn.Module):
    """PatchGAN: a logit per overlapping patch (no sigmoid: the loss takes logits). Shallower than
    pix2pix's 70x70 one (which LDM uses at 256 px): with 3 layers each logit sees 34x34 pixels,
    about a 32x32 image, and a 64x64 image's quarter."""

    def __init__(self, in_channels=3, base_channels=64, num_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, num_layers):
            stride = 2 if i < num_layers - 1 else 1
            layers += [nn.Conv2d(ch, ch * 2, 4, stride=stride, padding=1),
                       nn.GroupNorm(group_count(ch * 2), ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class VGG16Features(nn.Module):
    """Frozen VGG16 feature stack (torchvision's layout) returning the relu1_2, relu2_2,
    relu3_3 and relu4_3 maps for a perceptual loss. Weights are loaded by the caller."""

    taps = (3, 8, 15, 22)

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16
        self.features = vgg16(weights=None).features[: self.taps[-1] + 1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def forward(self, x):
        h = ((x + 1) / 2 - self.mean) / self.std
        if h.shape[-1] < 64:  # VGG's deeper taps are meaningless on 8x8 maps: upsample small images
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out
