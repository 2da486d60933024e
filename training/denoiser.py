"""The conditional denoiser stage: pixel or latent diffusion with label dropout for
classifier-free guidance, EMA, warm-up, and validation loss at fixed noise."""
import torch

from data import to_uint8
from diffusion.objective import DiffusionLoss
from errors import UserError
from models import build_denoiser
from pipeline import Pipeline, make_schedule
from training import distributed as dist
from training.optim import (autocast, compile_wanted, grads_finite_step, load_optimizer_state, lr_factor, make_ema,
                            make_optimizer, make_scaler, update_ema, warmup_schedule)


def latent_standardization(means):
    """Per-channel shift and scale that make the training latents zero-mean, unit-variance;
    stored with the denoiser and undone before decoding."""
    shift = means.mean(dim=(0, 2, 3), keepdim=True)[0]
    scale = means.std(dim=(0, 2, 3), keepdim=True)[0].clamp_min(1e-6)
    return shift, scale


# The held-out loss's timesteps and noise, the held-out latents' posterior draw and the samples
# scored during training come from this seed, not --seed: a resume may change --seed, and the best
# checkpoint is chosen on them.
HELDOUT_SEED = 1234


class DenoiserStage:
    kind = "conditional_diffusion"
    early_stopping = True  # the S4 seed's: stop when the held-out metric stops improving
    last_name, best_name = "conditional_diffusion_last.pt", "conditional_diffusion_best.pt"
    final_name = "conditional_diffusion_final.pt"
    saved_names = (best_name, final_name)  # what a finished or interrupted run leaves beside _last.pt

    def __init__(self, cfg, class_names, sample_shape, device, val_x, val_y, run, vae=None,
                 latent_shift=None, latent_scale=None, heldout_digest=None):
        self.cfg, self.device, self.run = cfg, device, run
        self.heldout_digest = heldout_digest  # data.split_digest of the held-out images: scores check it
        self.class_names, self.sample_size = list(class_names), sample_shape[-1]
        num_classes = len(class_names)
        self.model = build_denoiser(cfg, num_classes, sample_shape[0], self.sample_size).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = make_ema(self.model, cfg.ema_decay)
        self.train_model = dist.wrap(self.model, device)
        if compile_wanted(cfg.compile, device):
            self.train_model = torch.compile(self.train_model)
        self.opt = make_optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay, device=device)
        # --lr_schedule: a function of the fractional epoch just trained (of --diffusion_epochs), like
        # the VAE's, so a resumed run follows it exactly; the optimizer's saved lr is the next step's.
        self.epochs_done = 0.0
        self.sched = warmup_schedule(self.opt, cfg.warmup_steps, lambda: self.lr_share(self.epochs_done))
        self.scaler = make_scaler(device, cfg.amp)
        self.schedule = make_schedule(cfg)
        self.loss_fn = DiffusionLoss(self.schedule, cfg.prediction, cfg.loss_weighting, terms=cfg.loss,
                                     timestep_sampling=cfg.timestep_sampling, sum_across_ranks=dist.sum_across_ranks)
        self.val_x, self.val_y = val_x[:512].to(device), val_y[:512].to(device)
        self.vae, self.latent_shift, self.latent_scale = vae, latent_shift, latent_scale
        self.num_classes = num_classes
        # --eval_every's classifier and real features now: a missing classifier is refused before training
        self.offline = self.offline_metrics() if cfg.eval_every else None

    def pipeline(self):
        """A sampling pipeline over the EMA weights."""
        return Pipeline(self.cfg, self.ema.module, self.class_names, self.device, self.vae,
                        self.latent_shift, self.latent_scale)

    def prepare(self, x):
        """Latent batches hold (mean, logvar): draw a posterior sample and standardize it."""
        if self.vae is None:
            return x
        mean, logvar = x.chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return (z - self.latent_shift) / self.latent_scale

    def lr_share(self, epoch):
        """The learning rate's share of its peak after `epoch` (fractional) epochs, warm-up aside:
        --lr_schedule over --diffusion_epochs."""
        return lr_factor(self.cfg.lr_schedule, epoch / max(self.cfg.diffusion_epochs, 1))

    def train_step(self, x, y, epoch):
        self.epochs_done = epoch
        x0 = self.prepare(x)
        if self.device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        drop = torch.rand(y.shape, device=y.device) < self.cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)  # the null label
        with autocast(self.device, self.cfg.amp):
            loss = self.loss_fn(self.train_model, x0, y)
        if not grads_finite_step(loss, list(self.model.parameters()), self.opt, self.cfg.grad_clip, self.scaler):
            return None
        self.sched.step()
        update_ema(self.ema, self.model)
        return {"loss": loss.detach()}

    @property
    def best_metric(self):
        """With --eval_every, the best checkpoint is the one whose samples are closest to the
        held-out images in the real-data classifier's features; else the held-out loss."""
        return ("classifier_fd_heldout", "min") if self.cfg.eval_every else ("val_loss", "min")

    def eval_samples_per_rank(self):
        return max(self.cfg.eval_samples // dist.world_size(), 1)

    def offline_metrics(self):
        from evaluation.evaluate import OfflineMetrics, check_sample_count, load_real_classifier
        check_sample_count(self.eval_samples_per_rank() * dist.world_size(), self.num_classes, "--eval_every",
                           "--eval_samples")
        classifier = load_real_classifier(self.cfg, self.device, self.cfg.classifier_path)
        return OfflineMetrics(classifier, self.cfg, self.device, self.num_classes)

    def sample_metrics(self):
        """Offline metrics of eval_samples samples, generated across ranks and gathered."""
        from evaluation.evaluate import balanced_labels
        per_rank = self.eval_samples_per_rank()
        labels = balanced_labels(per_rank * dist.world_size(), self.num_classes)
        # Rank r draws images r*per_rank... with their own seeds: the same images on any number of
        # GPUs, gathered back in order.
        first = dist.rank() * per_rank
        images = self.pipeline().sample_batched(labels[first:first + per_rank], seed=HELDOUT_SEED + first)
        images = dist.gather_tensor(to_uint8(images).to(self.device)).cpu()
        m = self.offline(images, labels)
        return {k: m[k] for k in ("sample_accuracy", "classifier_fd", "classifier_fd_heldout", "classifier_kid")} | \
            {"near_copy_fraction": m["memorization"]["near_copy_fraction"]}

    @torch.no_grad()
    def validate(self, epoch):
        """Loss of the EMA model on held-out data at fixed timesteps and noise, so epochs compare;
        every eval_every epochs also the offline sample metrics."""
        g = torch.Generator(device="cpu").manual_seed(HELDOUT_SEED)
        x0 = self.val_x
        t = torch.randint(0, self.schedule.timesteps, (len(x0),), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        with autocast(self.device, self.cfg.amp):
            loss = self.loss_fn(self.ema.module.eval(), x0, self.val_y, t=t, noise=noise)
        row = {"val_loss": dist.mean_across_ranks(float(loss))}
        if self.cfg.eval_every and epoch % self.cfg.eval_every == 0:
            row.update(self.sample_metrics())
        return row

    def pictures(self, epoch):
        from viz.figures import class_sample_grid, plot_losses
        class_sample_grid(self.pipeline(), self.run.picture(f"samples_epoch{epoch:04d}.png"), per_class=8,
                          seed=self.cfg.seed, title=f"epoch {epoch}")
        plot_losses(self.run, self.kind, self.run.path("diffusion_loss.png"))

    def state_dict(self):
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "class_names": self.class_names,
                 "sample_size": self.sample_size, "heldout_digest": self.heldout_digest}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.loss_fn.adaptive is not None and self.loss_fn.adaptive.mean_sq is not None:
            state["adaptive_timesteps"] = self.loss_fn.adaptive.state_dict()
        if self.vae is not None:
            state.update(vae=self.vae.state_dict(), latent_shift=self.latent_shift.cpu(),
                         latent_scale=self.latent_scale.cpu())
        return state

    def load_state_dict(self, state):
        saved = state.get("heldout_digest")  # runs from before 2026-11-25 have none
        if saved is not None and saved != self.heldout_digest:
            raise UserError("the data holds out other images than when the run started (files added or removed, "
                            "or another --val_fraction or --flowers_splits): its held-out metrics and best "
                            "checkpoint would change meaning; resume it on the same data")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        load_optimizer_state(self.opt, state["opt"], self.device)
        self.sched.load_state_dict(state["sched"])
        # A resumed run may be given another --lr: rescale, so warm-up and schedule go on from it.
        for i, group in enumerate(self.opt.param_groups):
            if self.sched.base_lrs[i] != self.cfg.lr:
                group["lr"] *= self.cfg.lr / self.sched.base_lrs[i]
                group["initial_lr"] = self.sched.base_lrs[i] = self.cfg.lr
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.loss_fn.adaptive is not None and "adaptive_timesteps" in state:
            self.loss_fn.adaptive.load_state_dict({k: v.to(self.device) for k, v in state["adaptive_timesteps"].items()})

