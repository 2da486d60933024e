"""A trained run as one object: denoiser (+ VAE for latent models) + schedule + class names.
Samples images for labels with any sampler and guidance; generate.py, visualize.py, the
evaluation code and the training pictures all go through it."""
import json
import math
import os

import torch

from config import Config, build_config, validate
from data import to_float
from diffusion.guidance import make_denoiser
from diffusion.samplers import sample as run_sampler
from diffusion.schedule import NoiseSchedule
from errors import UserError, first_line
from models import build_denoiser, build_vae
from training.checkpoint import all_finite, check_compatible, load_checkpoint
from training.optim import autocast

DENOISER_FILES = ("conditional_diffusion_final.pt", "conditional_diffusion_last.pt")
VAE_FILES = ("vae_gan_best.pt", "vae_gan_last.pt")


def make_schedule(cfg):
    return NoiseSchedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)


@torch.no_grad()
def encode_images(vae, images_uint8, device, batch_size=256, flip=False):
    """Posterior (mean, logvar) of every image, optionally of its mirror image."""
    means, logvars = [], []
    for i in range(0, len(images_uint8), batch_size):
        x = to_float(images_uint8[i:i + batch_size].to(device))
        if flip:
            x = x.flip(-1)
        mean, logvar = vae.encode(x)
        means.append(mean.float())
        logvars.append(logvar.float())
    return torch.cat(means), torch.cat(logvars)


class Pipeline:
    checkpoint_path = None  # the file a loaded pipeline came from (load_pipeline sets it)
    heldout_digest = None  # its run's fingerprint of the held-out images (data.split_digest), if saved

    def __init__(self, cfg, denoiser, class_names, device, vae=None, latent_shift=None, latent_scale=None):
        self.cfg, self.denoiser, self.class_names, self.device = cfg, denoiser, list(class_names), device
        self.vae, self.latent_shift, self.latent_scale = vae, latent_shift, latent_scale
        self.schedule = make_schedule(cfg)
        image_size = cfg.image_size
        if vae is not None:
            self.sample_shape = (cfg.latent_channels, vae.latent_size, vae.latent_size)
        else:
            self.sample_shape = (3, image_size, image_size)

    @property
    def num_classes(self):
        return len(self.class_names)

    def class_index(self, name):
        """A class by its name, in any case, or by its file-safe name: "pink-yellow dahlia?" is also
        "pink-yellow dahlia" (no shell glob to type) and "pink-yellow_dahlia" (its folder's name)."""
        from data import safe_name
        lowered = {c.lower(): i for i, c in enumerate(self.class_names)}
        safe = {safe_name(c).lower(): i for i, c in enumerate(self.class_names)}
        for key, names in ((name.lower(), lowered), (safe_name(name).lower(), safe)):
            if key in names:
                return names[key]
        raise UserError(f"unknown class {name!r}; valid names: {', '.join(self.class_names)}")

    def to_model_space(self, images_uint8):
        """Images -> what the denoiser sees: pixels in [-1, 1] or standardized latents."""
        if self.vae is None:
            return to_float(images_uint8.to(self.device))
        mean, _ = encode_images(self.vae, images_uint8, self.device)
        return (mean - self.latent_shift) / self.latent_scale

    @torch.no_grad()
    def decode(self, z):
        """Model space -> images in [-1, 1]. For latents, the standardization is undone first."""
        if self.vae is None:
            return z.clamp(-1, 1)
        return self.vae.decode(z * self.latent_scale + self.latent_shift).float().clamp(-1, 1)

    def network(self, x_t, t, y):
        """The denoiser under the run's mixed precision (--amp; bf16 on CUDA by default); the
        samplers' arithmetic stays in float32."""
        with autocast(torch.device(self.device), self.cfg.amp):
            return self.denoiser(x_t, t, y).float()

    def eps_fn(self, x_t, t, y):
        """The network's noise prediction (any parameterisation converted), for the
        diffusion classifier."""
        from diffusion.objective import to_x0_eps
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        return to_x0_eps(self.network(x_t, t, y), x_t, alpha, sigma, self.cfg.prediction)[1]

    @torch.inference_mode()
    def sample(self, labels, *, sampler=None, steps=None, guidance_scale=None, guidance_schedule=None,
               guidance_interval=None, seed=0, callback=None, x_T=None, decode=True, eta=0.0):
        """Sample one image per label. Same seed, labels and settings: same images. Image i starts
        from noise of its own seed, seed + i, so it does not depend on the batch it is drawn in
        (DDPM's step noise, from seed's stream, still does). The sampling settings default to the
        run's; guidance_interval=(0, math.inf) guides at every step."""
        cfg = self.cfg
        sampler, steps = sampler or cfg.sampler, steps or cfg.steps
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        labels = torch.as_tensor(labels, device=self.device, dtype=torch.long)
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(labels))]
        if x_T is None:
            x_T = torch.stack([torch.randn(self.sample_shape, generator=g) for g in generators]).to(self.device)
        was_training = self.denoiser.training
        self.denoiser.eval()
        denoise = make_denoiser(self.network, self.schedule, cfg.prediction, labels, self.num_classes,
                                guidance_scale, guidance_schedule or cfg.guidance_schedule,
                                clip_x0=None if self.vae is not None else 1.0, steps=steps,
                                guidance_interval=guidance_interval or cfg.guidance_interval)
        # DDPM's noise from a seed drawn off the first image's stream: seed + 1 would replay the
        # second image's x_T.
        noise_seed = int(torch.randint(2 ** 62, (1,), generator=generators[0]))
        noise_generator = torch.Generator(device=self.device).manual_seed(noise_seed)
        z = run_sampler(sampler, denoise, x_T, self.schedule, steps, generator=noise_generator,
                        callback=callback, eta=eta)
        self.denoiser.train(was_training)
        out = self.decode(z) if decode else z
        if self.checkpoint_path is not None and not bool(torch.isfinite(out).all()):
            self._refuse_non_finite(sampler, steps, guidance_scale)
        return out

    def sampling_settings(self, sampler=None, steps=None, guidance_scale=None, guidance_schedule=None,
                          guidance_interval=None, **_):
        """What sample() with these arguments runs, in words for a picture's title, e.g.
        "dpmpp 20 steps, guidance 11 ramped linearly"."""
        cfg = self.cfg
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        schedule, interval = guidance_schedule or cfg.guidance_schedule, guidance_interval or cfg.guidance_interval
        guidance = "no guidance" if scale == 1 else f"guidance {scale:g}"
        if scale > 1 and schedule != "constant":  # schedules shape guidance above 1 only
            guidance += {"linear": " ramped linearly", "adaptive": " on the adaptive schedule"}[schedule]
        if scale != 1 and interval is not None and (interval[0] > 0 or interval[1] < math.inf):
            guidance += (f" for sigma/alpha in ({interval[0]:g}, {interval[1]:g}]" if interval[1] < math.inf
                         else f" for sigma/alpha above {interval[0]:g}")
        return f"{sampler or cfg.sampler} {steps or cfg.steps} steps, {guidance}"

    def refuse_non_finite_weights(self):
        """A checkpoint with NaN/inf weights samples black images and meaningless metrics: refuse
        it by name (load_pipeline does, before any work; a few ms)."""
        vae_parts = [self.vae.state_dict(), self.latent_shift, self.latent_scale] if self.vae is not None else []
        if not all_finite([self.denoiser.state_dict(), *vae_parts]):
            raise UserError(f"{self.checkpoint_path} holds non-finite weights (NaN or inf): its samples would "
                            f"be blank; use another checkpoint of the run")

    def _refuse_non_finite(self, sampler, steps, guidance_scale):
        """Samples of a loaded checkpoint came out NaN/inf: say whether its weights or the
        sampling settings are the cause."""
        self.refuse_non_finite_weights()
        raise UserError(f"sampling from {self.checkpoint_path} gave non-finite values (NaN or inf) with "
                        f"--sampler {sampler} --steps {steps} --guidance_scale {guidance_scale} "
                        f"--amp {self.cfg.amp}: try another sampler, lower guidance or --amp none")

    def sample_batched(self, labels, batch_size=256, **kwargs):
        """Many images in batches: image i from seed + i whatever the batch size (see sample)."""
        seed = kwargs.pop("seed", 0)
        labels = torch.as_tensor(labels)
        out = [self.sample(labels[i:i + batch_size], seed=seed + i, **kwargs).cpu()
               for i in range(0, len(labels), batch_size)]
        return torch.cat(out)


def require_parts(stage, names, path, what):
    """Refuse a checkpoint whose stage lacks any of `names`, naming the file and the parts."""
    missing = [k for k in names if not isinstance(stage, dict) or k not in stage]
    if missing:
        raise UserError(f"{path} is not a complete {what} checkpoint (no {', '.join(missing)} inside)")


def load_weights(module, weights, path, part):
    """module.load_state_dict(weights) for a module built from the checkpoint's own config;
    weights that do not fit it (a config edited after training, a damaged file) give one line
    naming the file and the first tensor that differs, not torch's list of every mismatch."""
    if not isinstance(weights, dict):
        raise UserError(f"{path} is damaged: its {part} weights are a {type(weights).__name__}, not a state dict")
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        expected = module.state_dict()
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected]
        def shape(t):
            return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        wrong = [k for k in expected if k in weights and shape(weights[k]) != shape(expected[k])]
        detail = (f"{wrong[0]} is {shape(weights[wrong[0]])} in the file, {shape(expected[wrong[0]])} by the config"
                  if wrong else f"no {missing[0]} in the file" if missing
                  else f"an unknown tensor {unexpected[0]}" if unexpected else type(e).__name__)
        raise UserError(f"{path} does not match its own config: its {part} weights do not fit the model its "
                        f"config and class names describe ({detail})") from None


def first_file(folder, names):
    """The first of `names` that exists in `folder`, or None."""
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def config_of_saved_run(args, folder, names, what):
    """The flags in `args` over the config a run in `folder` was trained with (build_config's rule:
    only runtime settings may differ): the config inside the first of the checkpoints `names`
    there is (each stage rewrites config.json), else config.json's. Returns (config, the file it
    came from); (None, config.json) where neither exists. `what` names the command in the error
    for a config edited into nonsense."""
    own = first_file(folder, names)
    source = own or os.path.join(folder, "config.json")
    if own is None and not os.path.isfile(source):
        return None, source
    try:
        if own is not None:
            saved = load_checkpoint(own)["config"]
        else:
            with open(source) as f:
                saved = json.load(f)
        return build_config(args, base=Config.from_dict(saved)), source
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{what}: cannot read the run's config in {source}: {e}") from None


def resolve_denoiser_path(results_dir=None, model_path=None):
    if model_path:
        if os.path.isdir(model_path):
            raise UserError(f"--model_path {model_path} is a folder: give the checkpoint file, or the folder "
                            f"as --results_dir")
        if not os.path.isfile(model_path):
            raise UserError(f"--model_path {model_path} does not exist")
        return model_path
    if not results_dir or not os.path.isdir(results_dir):
        raise UserError(f"results folder {results_dir} does not exist; train a model first with "
                        f"`python main.py --train_all --results_dir {results_dir}`")
    path = first_file(results_dir, DENOISER_FILES)
    if path is not None:
        return path
    raise UserError(f"no trained denoiser in {results_dir} (looked for {' or '.join(DENOISER_FILES)}); "
                    f"train one with `python main.py --train_diffusion --results_dir {results_dir}`")


def load_vae_state(results_dir, cfg=None):
    path = first_file(results_dir, VAE_FILES)
    if path is not None:
        state = load_checkpoint(path, "VAE checkpoint")
        if cfg is not None:
            check_compatible(state, cfg, "vae_gan", path)
        return state, path
    raise UserError(f"no trained VAE in {results_dir} (looked for {' or '.join(VAE_FILES)}); "
                    f"train one with `python main.py --train_vae --results_dir {results_dir}`")


def load_pipeline(results_dir=None, model_path=None, device="cpu", overrides=None, use_ema=True):
    """Build the Pipeline of a trained run. `overrides` (argparse namespace) may change runtime
    fields such as the sampler, never the architecture."""
    path = resolve_denoiser_path(results_dir, model_path)
    state = load_checkpoint(path, "denoiser checkpoint")
    if state["kind"] != "conditional_diffusion":
        raise UserError(f"{path} holds a {state['kind']} checkpoint, not a denoiser")
    stage = state.get("stage")
    require_parts(stage, ("class_names", "sample_size", "ema" if use_ema else "model"), path, "denoiser")
    try:  # a config edited by hand: wrong types, a list cut short
        cfg = Config.from_dict(state["config"])
        cfg = build_config(overrides, base=cfg) if overrides is not None else validate(cfg, new_run=False)
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"{path} is damaged: its config does not read ({type(e).__name__}: "
                        f"{first_line(e, 120)})") from None
    if cfg.is_latent:
        require_parts(stage, ("vae", "latent_shift", "latent_scale"), path, "latent denoiser")
    class_names = stage["class_names"]
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) and c for c in class_names):
        raise UserError(f"{path} is damaged: its class_names are not a list of class names")
    if not class_names:
        raise UserError(f"{path} is damaged: it names no classes")
    in_channels = cfg.latent_channels if cfg.is_latent else 3
    size = stage["sample_size"]
    if not (isinstance(size, int) and size > 0):
        raise UserError(f"{path} is damaged: its sample_size {size!r} is not the side of its images or latents")
    try:
        denoiser = build_denoiser(cfg, len(class_names), in_channels, size)
    except (TypeError, ValueError) as e:  # e.g. channel_mults edited into a string
        raise UserError(f"{path} is damaged: its config does not build a {cfg.model} ({type(e).__name__}: "
                        f"{first_line(e, 120)})") from None
    weights = stage["ema"] if use_ema else stage["model"]
    if use_ema and isinstance(weights, dict):  # AveragedModel keys: "module.<name>" plus its n_averaged counter
        weights = {k[len("module."):]: v for k, v in weights.items() if k.startswith("module.")}
    load_weights(denoiser, weights, path, "denoiser")
    denoiser.to(device).eval()
    vae = shift = scale = None
    if cfg.is_latent:
        vae = build_vae(cfg, len(class_names), cfg.image_size)
        load_weights(vae, stage["vae"], path, "VAE")
        vae.to(device).eval()
        shift, scale = stage["latent_shift"], stage["latent_scale"]
        for name, t in (("latent_shift", shift), ("latent_scale", scale)):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == (in_channels, 1, 1)):
                raise UserError(f"{path} is damaged: its {name} is not a per-channel tensor of {in_channels} channels")
        shift, scale = shift.to(device), scale.to(device)
    pipe = Pipeline(cfg, denoiser, class_names, device, vae, shift, scale)
    pipe.checkpoint_path, pipe.heldout_digest = path, stage.get("heldout_digest")
    pipe.refuse_non_finite_weights()
    return pipe
