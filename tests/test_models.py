"""Networks: shapes, the channel-wise LayerNorm, attention, the UNet with and without attention,
and the VAE-GAN's stage schedule and VGG loading."""
import pytest
import torch

from config import Config, PRESETS
from errors import UserError
from models import build_denoiser, build_vae
from models.blocks import LayerNorm2d, SelfAttention2d, group_count
from models.vae import PatchDiscriminator
from training.vae_gan import CenterLoss, load_vgg16, loss_weights


def test_layernorm2d_normalises_each_pixel_over_channels():
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    y = LayerNorm2d(8)(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 5, 5), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 5, 5), atol=1e-3)
    assert not torch.allclose(y.mean((2, 3)), torch.zeros(2, 8), atol=1e-2)  # not InstanceNorm


def test_group_count_divides_any_width_and_keeps_the_usual_ones():
    assert [group_count(c) for c in (4, 32, 64, 128, 192, 256, 512)] == [1, 8, 16, 32, 32, 32, 32]
    for c in range(1, 400):
        assert c % group_count(c) == 0 and 1 <= group_count(c) <= 32


@pytest.mark.parametrize("width", [40, 48, 96])
def test_unet_builds_and_runs_at_widths_off_the_powers_of_two(width):
    cfg = Config(**{**PRESETS["cpu"], "base_channels": width})  # width 48: 144-channel skip concatenations
    net = build_denoiser(cfg, 2, 8, 8)
    x, t, y = torch.randn(2, 8, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 1])
    assert net(x, t, y).shape == x.shape


def test_self_attention_mixes_positions():
    attn = SelfAttention2d(8, num_heads=2)
    x = torch.randn(1, 8, 4, 4)
    x2 = x.clone()
    x2[..., 0, 0] += 5  # change one pixel: attention lets every output pixel see it
    diff = (attn(x) - attn(x2)).abs().sum(1)[0]
    assert (diff[1:, 1:] > 0).all()


def test_self_attention_hands_sdpa_dense_heads(monkeypatch):
    """Fused SDPA kernels (flash, memory-efficient) take only inputs whose last dim has stride 1;
    others fall back to the math kernel, which builds the whole HW x HW matrix."""
    import models.blocks
    seen, sdpa = [], models.blocks.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.extend(t.stride(-1) for t in (q, k, v))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(models.blocks.F, "scaled_dot_product_attention", spy)
    attn = SelfAttention2d(8, num_heads=2)
    x = torch.randn(2, 8, 4, 4)
    out = attn(x)
    assert seen == [1, 1, 1]
    heads = attn.qkv(attn.norm(x)).reshape(2, 3, 2, 4, 16).transpose(-1, -2)  # the attention written out
    weights = torch.softmax(heads[:, 0] @ heads[:, 1].transpose(-1, -2) / 2.0, dim=-1)
    expected = x + attn.proj((weights @ heads[:, 2]).transpose(-1, -2).reshape(2, 8, 4, 4))
    assert torch.allclose(out, expected, atol=1e-5)


def tiny_cfg(**kw):
    return Config(**{**PRESETS["tiny"], **kw})


@pytest.mark.parametrize("size,mults", [(32, (1, 2, 2)), (64, (1, 2, 2, 4))])
def test_vae_has_a_spatial_latent_and_decodes_back(size, mults):
    vae = build_vae(tiny_cfg(vae_channel_mults=mults), num_classes=3, image_size=size)
    x = torch.randn(2, 3, size, size)
    recon, mean, logvar, z = vae(x)
    assert mean.shape == (2, 4, 8, 8) and recon.shape == x.shape
    assert vae.classify(mean).shape == (2, 3)


def test_vae_block_attention_off_keeps_only_the_bottleneck_attention():
    from models.blocks import ChannelAttention, SpatialAttention
    count = lambda m, kind: sum(isinstance(x, kind) for x in m.modules())  # noqa: E731
    full, light = build_vae(tiny_cfg(), 2, 32), build_vae(tiny_cfg(vae_block_attention=False), 2, 32)
    assert count(full, ChannelAttention) > 0 and count(full, SpatialAttention) > 0
    assert count(light, ChannelAttention) == 0 and count(light, SpatialAttention) == 0
    assert count(light, SelfAttention2d) == count(full, SelfAttention2d) == 2  # encoder and decoder
    assert light(torch.randn(2, 3, 32, 32))[0].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("model", ["latent_unet", "latent_transformer", "unet", "attn_unet"])
def test_denoisers_keep_shape_and_use_the_label(model):
    cfg = tiny_cfg(model=model, attention_resolutions=(16, 8) if model == "attn_unet" else
                   ((8, 4) if model == "latent_unet" else ()), patch_size=2)
    channels, size = (4, 8) if model.startswith("latent") else (3, 32)
    net = build_denoiser(cfg, 2, channels, size)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # zero-init output would hide the label
    x, t = torch.randn(2, channels, size, size), torch.tensor([3, 50])
    out_a, out_b = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 2]))  # 2 = null label
    assert out_a.shape == x.shape and not torch.allclose(out_a, out_b)


def test_simple_unet_has_no_attention_and_attn_unet_has_some():
    count = lambda m: sum(isinstance(x, SelfAttention2d) for x in m.modules())  # noqa: E731
    assert count(build_denoiser(tiny_cfg(model="unet", attention_resolutions=()), 10, 3, 32)) == 0
    assert count(build_denoiser(tiny_cfg(model="attn_unet", attention_resolutions=(16, 8)), 10, 3, 32)) > 2


def test_patch_discriminator_gives_logits_per_patch():
    out = PatchDiscriminator(3, 16)(torch.randn(2, 3, 32, 32))
    assert out.dim() == 4 and out.shape[1] == 1 and out.shape[-1] > 1
    assert out.min() < 0 or out.max() > 1  # raw logits, no sigmoid


def test_stage_schedule_weights_at_chosen_epochs():
    cfg = Config(kl_weight=1e-4, kl_start_epoch=0, kl_warmup_epochs=10, classifier_weight=0.1, center_weight=0.01,
                 class_loss_start_epoch=5, class_loss_ramp_epochs=5, adv_weight=0.05, adv_start_epoch=20,
                 adv_ramp_epochs=4, perceptual_weight=0.1)
    w0, w5, w7, w10, w21, w30 = (loss_weights(cfg, e) for e in (0, 5, 7.5, 10, 21, 30))
    assert w0["kl"] == 0 and w5["kl"] == pytest.approx(0.5e-4) and w10["kl"] == pytest.approx(1e-4)
    assert w0["classifier"] == 0 and w5["classifier"] == 0 and w7["classifier"] == pytest.approx(0.05)
    assert w10["center"] == pytest.approx(0.01)
    assert w10["adversarial"] == 0 and w21["adversarial"] == pytest.approx(0.0125) and w30["adversarial"] == 0.05
    assert all(w["recon"] == 1 for w in (w0, w30))


def test_center_loss_pulls_and_repulsion_pushes():
    loss = CenterLoss(2, 4, margin=1.0)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0] * 4, [0.1] * 4]))
    z = torch.zeros(3, 4, 1, 1)
    pull, push = loss(z, torch.tensor([0, 0, 0]))
    assert pull.item() == pytest.approx(0.0) and push.item() > 0
    push.backward()
    assert (loss.centers.grad[1] < 0).all()  # gradient descent moves center 1 away from center 0


def test_vgg_weights_missing_names_both_places_and_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError) as e:
        load_vgg16(None)
    msg = str(e.value)
    assert "--vgg_weights" in msg and str(tmp_path) in msg and "--perceptual_weight 0" in msg


def test_vgg_weights_from_an_explicit_path(tmp_path):
    from models.vae import VGG16Features
    net = VGG16Features()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in net.features.state_dict().items()}, path)
    loaded = load_vgg16(str(path))
    feats = loaded(torch.randn(1, 3, 32, 32))
    assert len(feats) == 4 and not any(p.requires_grad for p in loaded.parameters())
