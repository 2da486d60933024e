"""Networks only (no training logic), built by name from a config."""
from models.unet import UNet
from models.vae import AttentionVAE, PatchDiscriminator, VGG16Features


def build_vae(cfg, num_classes, image_size):
    return AttentionVAE(3, image_size, num_classes, cfg.vae_base_channels, tuple(cfg.vae_channel_mults),
                        cfg.vae_res_blocks, cfg.latent_channels, block_attention=cfg.vae_block_attention)


def build_discriminator(cfg):
    return PatchDiscriminator(3, cfg.disc_channels)


LATENT_DENOISERS = ("latent_unet", "latent_transformer")  # denoise the VAE's latents, not pixels
TRANSFORMER_DENOISERS = ("transformer", "latent_transformer")


def build_denoiser(cfg, num_classes, in_channels, image_size):
    """The denoiser named by cfg.model: latent_unet / unet / attn_unet share one UNet class,
    transformer / latent_transformer one DiffusionTransformer class."""
    if cfg.model in ("latent_unet", "unet", "attn_unet"):
        return UNet(in_channels, image_size, num_classes, cfg.base_channels, tuple(cfg.channel_mults),
                    cfg.num_res_blocks, tuple(cfg.attention_resolutions), cfg.num_heads, cfg.dropout,
                    cfg.time_embed_dim)
    if cfg.model in TRANSFORMER_DENOISERS:
        from models.transformer import DiffusionTransformer
        return DiffusionTransformer.from_config(cfg, num_classes, in_channels, image_size)
    raise ValueError(f"unknown model {cfg.model!r}")


__all__ = ["LATENT_DENOISERS", "TRANSFORMER_DENOISERS", "UNet", "AttentionVAE", "PatchDiscriminator",
           "VGG16Features", "build_vae", "build_discriminator", "build_denoiser"]
