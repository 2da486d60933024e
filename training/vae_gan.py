"""The VAE-GAN stage: reconstruction (L1), VGG16 perceptual, KL, latent classifier, center
loss (learned centers, optional repulsion) and PatchGAN adversarial losses, each switched in
by the stage schedule of `loss_weights`."""
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from data import to_float
from errors import UserError, offline
from models import VGG16Features, build_discriminator, build_vae
from training import distributed as dist
from training.optim import autocast, grads_finite_step, load_optimizer_state, lr_factor, make_optimizer, make_scaler

VGG16_FILE = "vgg16-397923af.pth"


def ramp(epoch, start, length):
    """0 before `start`, then linear up to 1 over `length` epochs (a step if length is 0)."""
    if epoch < start:
        return 0.0
    return 1.0 if length <= 0 else min(1.0, (epoch - start) / length)


def loss_weights(cfg, epoch):
    """The weight of every VAE-GAN loss at (fractional) `epoch`: reconstruction first, KL rising,
    then classifier and center losses, then the adversarial loss."""
    cls = ramp(epoch, cfg.class_loss_start_epoch, cfg.class_loss_ramp_epochs)
    return {"recon": 1.0, "perceptual": cfg.perceptual_weight,
            "kl": cfg.kl_weight * ramp(epoch, cfg.kl_start_epoch, cfg.kl_warmup_epochs),
            "classifier": cfg.classifier_weight * cls, "center": cfg.center_weight * cls,
            "repulsion": cfg.repulsion_weight * cls,
            "adversarial": cfg.adv_weight * ramp(epoch, cfg.adv_start_epoch, cfg.adv_ramp_epochs)}


def load_vgg16(weights_path):
    """VGG16 ImageNet features: from --vgg_weights, else the torch hub cache, else torchvision's
    download (which needs internet)."""
    import torchvision
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    path = weights_path or cached
    if weights_path is None and not os.path.isfile(cached) and not offline():
        try:
            torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception:
            pass
    if not os.path.isfile(path):
        raise UserError(f"VGG16 weights for the perceptual loss not found: looked for --vgg_weights "
                        f"({weights_path or 'not given'}) and the torch hub cache ({cached}); put torchvision's "
                        f"{VGG16_FILE} in one of them, or pass --perceptual_weight 0 to train without it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a checkpoint, truncated, or pickled code weights_only refuses
        raise UserError(f"{path} is not a readable VGG16 checkpoint: {str(e).splitlines()[0][:200]}") from None
    net = VGG16Features()
    wanted = net.features.state_dict().keys()
    try:
        net.features.load_state_dict({k: state[f"features.{k}"] for k in wanted})
    except KeyError as e:
        raise UserError(f"{path} is not a torchvision VGG16 state dict (missing {e})") from None
    return net.eval()


def perceptual_distance(vgg, a, b):
    """Mean squared distance of channel-normalised VGG features (as LPIPS does, unweighted)."""
    total = 0.0
    for fa, fb in zip(vgg(a), vgg(b)):
        fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        total = total + (fa - fb).pow(2).sum(1).mean()
    return total


def kl_divergence(mean, logvar):
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


class CenterLoss(nn.Module):
    """Learned class centers in latent space: pulls each latent to its class center; the
    repulsion term keeps centers at least margin * sqrt(dim) apart."""

    def __init__(self, num_classes, dim, margin):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim) * 0.1)
        self.margin = margin * math.sqrt(dim)

    def forward(self, z, y):
        pull = (z.flatten(1) - self.centers[y]).pow(2).sum(1).mean() / z[0].numel()
        dist = torch.cdist(self.centers, self.centers)
        off_diag = ~torch.eye(len(self.centers), dtype=torch.bool, device=dist.device)
        push = F.relu(self.margin - dist[off_diag]).pow(2).mean() / z[0].numel() if len(self.centers) > 1 else dist.sum() * 0
        return pull, push


class VAEWithCenters(nn.Module):
    """The VAE, its latent classifier head and the class centers as one module, so that under
    torchrun one DDP wrapper sees every generator parameter used in each step and averages all
    their gradients (the centers included), whatever the loss weights of the moment."""

    def __init__(self, vae, center_loss):
        super().__init__()
        self.vae, self.center_loss = vae, center_loss

    def forward(self, x, y):
        recon, mean, logvar, _ = self.vae(x)
        pull, push = self.center_loss(mean.float(), y)
        return recon, mean, logvar, self.vae.classify(mean), pull, push


class VAEGANStage:
    kind = "vae_gan"
    last_name, best_name = "vae_gan_last.pt", "vae_gan_best.pt"
    saved_names = (best_name,)
    best_metric = ("val_psnr", "max")

    def __init__(self, cfg, num_classes, image_size, device, val_set, run, class_names):
        self.cfg, self.device, self.run, self.class_names = cfg, device, run, class_names
        self.vae = build_vae(cfg, num_classes, image_size).to(device)
        self.disc = build_discriminator(cfg).to(device)
        latent_dim = cfg.latent_channels * self.vae.latent_size ** 2
        self.center_loss = CenterLoss(num_classes, latent_dim, cfg.center_margin).to(device)
        self.vgg = load_vgg16(cfg.vgg_weights).to(device) if cfg.perceptual_weight > 0 else None
        self.generator_ddp = dist.wrap(VAEWithCenters(self.vae, self.center_loss), device)
        self.disc_ddp = dist.wrap(self.disc, device)
        gen_params = list(self.vae.parameters()) + list(self.center_loss.parameters())
        self.opt_g = make_optimizer(gen_params, cfg.vae_lr, betas=(0.5, 0.9), device=device)
        self.opt_d = make_optimizer(self.disc.parameters(), cfg.vae_lr, betas=(0.5, 0.9), device=device)
        self.gen_params = gen_params
        self.scaler_g, self.scaler_d = make_scaler(device, cfg.amp), make_scaler(device, cfg.amp)  # one per optimizer
        self.val_images, self.val_labels = val_set.images[:2000], val_set.labels[:2000]

    def lr_share(self, epoch):
        """The learning rate's share of its peak after `epoch` (fractional) epochs: --vae_lr_schedule
        over --vae_epochs. A function of the epoch, like the loss weights, so a resumed run follows it
        exactly."""
        return lr_factor(self.cfg.vae_lr_schedule, epoch / max(self.cfg.vae_epochs, 1))

    def train_step(self, x, y, epoch):
        cfg, w = self.cfg, loss_weights(self.cfg, epoch)
        lr = cfg.vae_lr * self.lr_share(epoch)
        for group in (*self.opt_g.param_groups, *self.opt_d.param_groups):
            group["lr"] = lr
        with autocast(self.device, cfg.amp):
            # The class terms are computed even at weight 0: DDP needs every parameter in the graph.
            recon, mean, logvar, logits, pull, push = self.generator_ddp(x, y)
            losses = {"recon": (recon.float() - x).abs().mean(), "kl": kl_divergence(mean.float(), logvar.float()),
                      "classifier": F.cross_entropy(logits.float(), y), "center": pull, "repulsion": push}
            if self.vgg is not None:
                losses["perceptual"] = perceptual_distance(self.vgg, recon.float(), x)
            if w["adversarial"] > 0:  # non-saturating GAN loss on the PatchGAN's logits, through a frozen
                # discriminator outside DDP: its own gradients would be computed, all-reduced and thrown away
                self.disc.requires_grad_(False)
                losses["adversarial"] = F.softplus(-self.disc(recon).float()).mean()
            total = sum(w[k] * v for k, v in losses.items())
        stepped = grads_finite_step(total, self.gen_params, self.opt_g, cfg.vae_grad_clip, self.scaler_g)
        self.disc.requires_grad_(True)
        if not stepped:
            return None
        if w["adversarial"] > 0:
            with autocast(self.device, cfg.amp):  # one forward of real and fake: DDP allows one per backward
                real, fake = self.disc_ddp(torch.cat([x, recon.detach()])).float().chunk(2)
                d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
            if grads_finite_step(d_loss, list(self.disc.parameters()), self.opt_d, cfg.vae_grad_clip,
                                 self.scaler_d):
                losses["discriminator"] = d_loss
            else:  # the generator's step stands: not a skipped step, but metrics.csv counts these
                losses["discriminator_skipped"] = torch.ones((), device=self.device)
        losses["total"] = total
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def reconstruct(self, images_uint8, batch=256):
        self.vae.eval()
        out = [self.vae(to_float(images_uint8[i:i + batch].to(self.device)), sample=False)
               for i in range(0, len(images_uint8), batch)]
        self.vae.train()
        return out

    def validate(self, epoch):
        outputs = self.reconstruct(self.val_images)
        x = to_float(self.val_images.to(self.device))
        recon = torch.cat([o[0] for o in outputs]).clamp(-1, 1)
        mean = torch.cat([o[1] for o in outputs])
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)
        self.vae.eval()  # the latent classifier's dropout off, as for the reconstructions
        with torch.no_grad():
            accuracy = (self.vae.classify(mean).argmax(1).cpu() == self.val_labels).float().mean()
        self.vae.train()
        return {"val_l1": float((recon - x).abs().mean()),
                "val_psnr": float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()),
                "val_latent_accuracy": float(accuracy)}

    def pictures(self, epoch):
        from viz.figures import plot_losses, reconstruction_grid
        import shutil
        path = self.run.picture(f"reconstructions_epoch{epoch:04d}.png")
        reconstruction_grid(self.vae, self.val_images, self.val_labels, self.class_names, path)
        shutil.copyfile(path, self.run.path("vae_samples_grid_subset.png"))  # the latest, under S5's name
        plot_losses(self.run, self.kind, self.run.path("autoencoder_losses.png"))

    def state_dict(self):
        state = {"vae": self.vae.state_dict(), "disc": self.disc.state_dict(),
                 "center_loss": self.center_loss.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict(), "class_names": list(self.class_names)}
        if self.scaler_g is not None:
            state.update(scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict())
        return state

    def load_state_dict(self, state):
        self.vae.load_state_dict(state["vae"])
        self.disc.load_state_dict(state["disc"])
        self.center_loss.load_state_dict(state["center_loss"])
        load_optimizer_state(self.opt_g, state["opt_g"], self.device)
        load_optimizer_state(self.opt_d, state["opt_d"], self.device)
        if self.scaler_g is not None and "scaler_g" in state:
            self.scaler_g.load_state_dict(state["scaler_g"])
            self.scaler_d.load_state_dict(state["scaler_d"])
