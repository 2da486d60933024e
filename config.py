"""One config for a run: defaults, named presets, per-dataset recipes, the command-line
flags shared by the three entry points, and validation of bad values."""
import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass

from diffusion.guidance import GUIDANCE_SCHEDULES
from diffusion.objective import LOSS_TERMS, LOSS_WEIGHTINGS, PREDICTIONS, TIMESTEP_SAMPLINGS
from diffusion.samplers import SAMPLERS
from diffusion.schedule import SCHEDULES
from errors import UserError
from files import atomic_path
from models import LATENT_DENOISERS, TRANSFORMER_DENOISERS
from models.transformer import ATTENTION_KINDS

DENOISERS = ("latent_unet", "latent_transformer", "unet", "attn_unet", "transformer")
AMP_MODES = ("auto", "bf16", "fp16", "none")


@dataclass
class Config:
    # --- run ---
    dataset: str = "cifar10_catdog"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None        # None: the dataset's default
    subset: int | None = None
    val_fraction: float = 0.1
    attribute: str = "Smiling"
    flowers_splits: str = "all"
    hflip: bool = True                    # training sees each image or its mirror image at random
    model: str = "latent_unet"
    results_dir: str | None = None        # None: results/<dataset>_<model>
    preset: str = "default"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                     # auto | bf16 | fp16 | none (auto: bf16 on CUDA and on CPUs with
    #                                       native bf16, fp16 on GPUs before Ampere, else fp32)
    compile: bool | None = None           # torch.compile the denoiser's training model (None: on CUDA)
    log_every: int = 50                   # steps between host syncs for logging
    picture_every: int = 10               # epochs between periodic pictures
    checkpoint_every: int = 1             # epochs between checkpoints
    max_bad_steps: int = 10               # non-finite steps in a row before stopping
    # --- VAE-GAN ---
    # The defaults are the recipe measured best per minute (BENCHMARKS.md): a light VAE (attention
    # only at its bottleneck, no residual blocks in the encoder's levels, no discriminator or
    # perceptual loss) trained in many small steps, its lr decayed to 0 over 8 epochs, and a
    # wall-clock budget of 4 + 16 minutes. --preset s1 restores the seeds' VAE-GAN and schedules.
    vae_epochs: int = 8
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_grad_clip: float = 0.0            # 0: off
    vae_lr_schedule: str = "cosine"       # constant | cosine (down to 0 over vae_epochs)
    vae_minutes: float | None = 4         # wall-clock budget of the stage (0 or None: epochs only)
    vae_base_channels: int = 32
    vae_channel_mults: tuple = (1, 2, 2)
    vae_res_blocks: int = 0
    vae_block_attention: bool = False     # channel + spatial attention in every VAE block (the seeds')
    latent_channels: int = 8
    kl_weight: float = 1e-6
    kl_start_epoch: int = 0               # stage schedule: each weight ramps linearly from 0 at its
    kl_warmup_epochs: int = 2             # start epoch to its full value over its ramp epochs
    perceptual_weight: float = 0.0
    vgg_weights: str | None = None
    classifier_weight: float = 0.1
    center_weight: float = 0.01
    repulsion_weight: float = 0.0
    center_margin: float = 1.0            # repulsion pushes centers apart to margin * sqrt(latent dim)
    class_loss_start_epoch: int = 0
    class_loss_ramp_epochs: int = 5
    adv_weight: float = 0.0
    adv_start_epoch: int = 20             # discriminator switched on after this warm-up
    adv_ramp_epochs: int = 5
    disc_channels: int = 64
    # --- denoiser ---
    base_channels: int = 64
    channel_mults: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2)  # on an 8x8 latent: 8x8 attention cost a third of each step
    num_heads: int = 4
    dropout: float = 0.1
    time_embed_dim: int | None = None
    transformer_width: int = 256          # transformer: token width, blocks, heads, patch size,
    transformer_depth: int = 8            # attention kind (linear: elu+1 kernel; softmax: SDPA)
    transformer_heads: int = 4
    patch_size: int = 2
    attention: str = "linear"
    mlp_ratio: float = 4.0
    transformer_decoder_channels: int = 64
    # --- diffusion ---
    schedule: str = "cosine"              # linear | cosine | edm (EDM's log-normal noise levels)
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "v"
    loss_weighting: str = "min_snr"       # min-SNR-5 (BENCHMARKS.md: three seeds against uniform)
    label_dropout: float = 0.1
    loss: str = "mse"                     # mse | balanced (S2's MSE + L1 + cosine + Laplacian + Sobel)
    timestep_sampling: str = "uniform"    # uniform | adaptive (importance sampling by loss)
    # --- denoiser training ---
    diffusion_epochs: int = 1000          # the budget stops it first
    diffusion_minutes: float | None = 16
    batch_size: int = 128
    lr: float = 5e-4
    lr_schedule: str = "constant"         # constant | cosine (down to 0 over diffusion_epochs)
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    patience: int = 10                    # denoiser: stop after this many held-out evaluations (one
                                          # per epoch, or per --eval_every epochs) without a better
                                          # metric (0: never)
    # --- real-data classifier (offline metrics) ---
    classifier_epochs: int = 30
    classifier_width: int = 64
    classifier_lr: float = 2e-3
    classifier_batch_size: int = 128
    # --- evaluation during training ---
    eval_every: int = 0                   # epochs between offline metrics (0: off)
    eval_samples: int = 500
    classifier_path: str | None = None    # default: results/<dataset>_classifier/classifier_best.pt
    # --- sampling ---
    # DPM-Solver++ has converged at 20 steps; guidance ramped up linearly over the steps (none
    # while the layout forms) scored lower FD than constant for each of three training seeds; a
    # min-SNR-weighted denoiser scores its lowest FD at 11 (16 over-guides it).
    sampler: str = "dpmpp"
    steps: int = 20
    guidance_scale: float = 11.0
    guidance_schedule: str = "linear"
    guidance_interval: tuple | None = None  # (lo, hi]: guide only where lo < sigma_t / alpha_t <= hi

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"a config is a mapping of options, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**known)

    @property
    def is_latent(self):
        return self.model in LATENT_DENOISERS

    @property
    def vae_downsampling(self):
        return 2 ** (len(self.vae_channel_mults) - 1)

    @property
    def unet_downsampling(self):
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def denoiser_size(self):
        """The side of what the denoiser sees: the VAE's latent or the image itself."""
        return self.image_size // self.vae_downsampling if self.is_latent else self.image_size


# The seeds' settings where the measured defaults depart from them: the full attention VAE-GAN
# (attention in every block, VGG16 perceptual and PatchGAN losses, 4 latent channels, batch 128,
# constant lr) for 1200 epochs, a wide two-level latent UNet for 800 with an unweighted loss, no
# wall-clock budgets.
SEEDS = dict(vae_epochs=1200, vae_batch_size=128, vae_lr=2e-4, vae_grad_clip=1.0, vae_lr_schedule="constant",
             vae_minutes=None, vae_base_channels=64, vae_res_blocks=1, vae_block_attention=True, latent_channels=4,
             kl_warmup_epochs=10, perceptual_weight=0.1, adv_weight=0.05,
             base_channels=128, channel_mults=(1, 2), attention_resolutions=(8, 4), lr=2e-4, warmup_steps=500,
             loss_weighting="uniform", diffusion_epochs=800, diffusion_minutes=None, guidance_schedule="constant")

# Named presets: overrides applied on top of the dataset and model recipes.
PRESETS = {
    "default": {},
    # Small widths and short runs for smoke tests on a CPU, with every part of the seeds' VAE-GAN
    # switched on (block attention, encoder residual blocks, the discriminator) so they are exercised.
    # No vae_channel_mults: a dataset recipe's extra level must survive (64x64 keeps its 8x8 latent).
    "tiny": dict(transformer_width=32, transformer_depth=2, transformer_heads=2, patch_size=4,
                 transformer_decoder_channels=16, vae_base_channels=16, latent_channels=4, disc_channels=16,
                 vae_block_attention=True, vae_res_blocks=1, adv_weight=0.05,
                 base_channels=32, channel_mults=(1, 2), num_res_blocks=1, num_heads=2,
                 vae_batch_size=32, batch_size=32, timesteps=100, steps=10, warmup_steps=10,
                 vae_epochs=2, diffusion_epochs=2, picture_every=1, log_every=5,
                 kl_start_epoch=0, kl_warmup_epochs=1, class_loss_start_epoch=0, class_loss_ramp_epochs=1,
                 adv_start_epoch=1, adv_ramp_epochs=1, ema_decay=0.9,
                 classifier_width=8, classifier_batch_size=32, classifier_epochs=2, eval_samples=32),
    # The defaults as measured on a 2-core CPU (BENCHMARKS.md): bf16 autocast even where "auto"
    # would keep float32 (CPUs without native bf16), and a picture and loss read-out every epoch
    # of its short run.
    "cpu": dict(amp="bf16", picture_every=1, log_every=20),
    # The S1 seed's settings: 1000-step linear schedule, epsilon prediction, ancestral sampling,
    # no EMA, no classifier-free guidance (no label dropout, scale 1).
    "s1": {**SEEDS, **dict(schedule="linear", prediction="eps", sampler="ddpm", steps=1000, guidance_scale=1.0,
                           ema_decay=0.0, label_dropout=0.0)},
    # The S4 seed's pixel DDPM: beta 1e-4..0.02, 1000 steps, lr 3e-4, wd 0, batch 200, time dim 1024.
    "s4": {**SEEDS, **dict(model="unet", schedule="linear", beta_start=1e-4, beta_end=0.02, timesteps=1000,
                           prediction="eps", lr=3e-4, weight_decay=0.0, batch_size=200, time_embed_dim=1024,
                           base_channels=64, channel_mults=(1, 2, 2), attention_resolutions=(16, 8),
                           sampler="ddpm", steps=1000, guidance_scale=1.0)},
}

# The S3 stage schedule of the 64x64 VAE-GANs, as ramps (epochs): reconstruction from the start,
# KL rising over the first 20 epochs, then classifier and center losses (10 -> full at 20), then
# the PatchGAN's adversarial loss (30 -> full at 40).
S3_SCHEDULE = dict(kl_start_epoch=0, kl_warmup_epochs=20, class_loss_start_epoch=10, class_loss_ramp_epochs=10,
                   adv_start_epoch=30, adv_ramp_epochs=10)

# Per-dataset recipes: 64x64 images get one more VAE level, so the latent stays 8x8, and S3's
# stage schedule, with KL and the class losses from the start in a short run. A 64x64 VAE is what
# bounds the samples: 9 of the 20 minutes go to it (epochs: what fits in 9 minutes on the CPU), not
# 4 (measured on both datasets: BENCHMARKS.md). They sample at guidance 8: the cats/dogs scales were
# worse on both (Flowers102: 16 worst, 8 best; CelebA, three seeds: 8 best on mean FD and KID, 16
# worst). Loss weighting as measured per dataset: CelebA's is uniform (min-SNR was worse at every
# scale), Flowers102 keeps the default min-SNR (better on every metric, two seeds). A recipe's
# "presets" entry holds its settings under a named preset, applied after that preset's own: the
# seeds' runs get S3's schedule as it was.
RECIPE_64 = {**S3_SCHEDULE, **dict(kl_warmup_epochs=2, class_loss_start_epoch=0, vae_channel_mults=(1, 2, 2, 4),
                                   vae_minutes=9, diffusion_minutes=11, guidance_scale=8.0,
                                   presets={name: S3_SCHEDULE for name in ("s1", "s4")})}
DATASET_RECIPES = {
    "celeba_smiling": dict(**RECIPE_64, vae_epochs=6, loss_weighting="uniform"),
    # 102 classes in one 256-dim latent: S5's center loss with repulsion keeps the centers apart.
    "flowers102": {**RECIPE_64, **dict(vae_epochs=8, repulsion_weight=0.01)},
}

# Per-model defaults for the other denoisers.
MODEL_RECIPES = {
    "unet": dict(attention_resolutions=()),
    "attn_unet": dict(attention_resolutions=(16, 8)),
    # DiT on the VAE's latents: 2x2 patches of an 8x8 latent are 16 tokens, few enough for softmax
    # attention through SDPA (patch 1 cost 3.5x per step on a CPU and scored far worse in the same
    # 16 minutes: BENCHMARKS.md).
    "latent_transformer": dict(patch_size=2, attention="softmax"),
}


DEVICES = ("auto", "cuda", "mps", "cpu")  # --device everywhere; auto: CUDA, then MPS, then the CPU
MAX_GUIDANCE = 50.0  # --guidance_scale (and the sampling sweep's --guidance) lies in [0, MAX_GUIDANCE]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2, as argparse does), and a
    flag must be spelled in full: a prefix (--vae_lr for --vae_lr_schedule) is refused, not guessed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        import sys
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# A switch defaults to None like every other flag, so refuse_unused_flags reads None as "not given".
SWITCH = dict(action="store_true", default=None)


def add_common_args(parser, without=()):
    """Flags the entry points share, with the same names everywhere; `without` names those an
    entry point never reads, so that its --help does not offer them."""
    g = parser.add_argument_group("run")
    g.add_argument("--dataset", help="cifar10_catdog (default), cifar10, celeba_smiling, flowers102, folder")
    g.add_argument("--data_root", help="dataset folder (default ./datasets/<dataset>)")
    g.add_argument("--results_dir", help="the run's folder (default results/<dataset>_<model>)")
    g.add_argument("--model", choices=DENOISERS, help="denoiser (default latent_unet)")
    g.add_argument("--seed", type=int, help="random seed (same seed, same results)")
    g.add_argument("--device", choices=DEVICES, default="auto")
    if "batch_size" not in without:
        g.add_argument("--batch_size", type=int, help="batch size of the stage being run")
    if "subset" not in without:
        g.add_argument("--subset", type=int,
                       help="train on N images drawn at random (the same N images in every run), each class "
                            "keeping its share")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="named settings on top of the defaults (the measured 20-minute recipe): cpu (bf16 "
                        "autocast), s1 and s4 (the seeds'), tiny (smoke runs)")
    g.add_argument("--image_size", type=int, help="square image size (default: the dataset's)")
    g.add_argument("--attribute", help="CelebA attribute for celeba_smiling (default Smiling)")
    g.add_argument("--flowers_splits", choices=("all", "official"),
                   help="flowers102: 'all' pools every labelled image and holds out --val_fraction "
                        "(default); 'official' uses the 1020-image train split")
    g.add_argument("--val_fraction", type=float, help="held-out share of train when a dataset has no "
                                                      "validation split (default 0.1)")
    if "download" not in without:
        g.add_argument("--download", **SWITCH, help="let torchvision download the dataset")
    g.add_argument("--amp", choices=AMP_MODES,
                   help="mixed precision of training and sampling (auto: bf16 where the hardware has it natively, "
                        "GPUs of compute capability 8.0+ and CPUs with AVX512-BF16 or AMX; fp16 with loss "
                        "scaling on older GPUs; float32 elsewhere)")
    return parser


def positive_int(text):
    """argparse type for counts: argparse's own one-line error and exit 2 for 0 or less."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_sampling_args(parser):
    g = parser.add_argument_group("sampling")
    g.add_argument("--sampler", choices=SAMPLERS)
    g.add_argument("--steps", type=positive_int, help="sampling steps (network evaluations)")
    g.add_argument("--guidance_scale", type=float, help="classifier-free guidance; 1 = none, 0 = unconditional")
    g.add_argument("--guidance_schedule", choices=GUIDANCE_SCHEDULES)
    g.add_argument("--guidance_interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at noise levels LO < sigma/alpha <= HI (the conditional model alone "
                        "elsewhere); 0 and a value above the schedule's largest guide everywhere")
    return parser


def _refuse_options_of_other_datasets(flags, dataset):
    from data import dataset_options  # late import: data imports nothing from here
    for name in ("attribute", "flowers_splits"):
        if name in flags and name not in dataset_options(dataset):
            raise UserError(f"--{name} does not apply to --dataset {dataset}")


def refuse_unused_flags(args, used, policed, what):
    """A flag that `what` does not read is refused, never parsed and ignored. Given means not None:
    every flag defaults to None (switches too), so a 0 or a --no-X is given."""
    for name in sorted(policed - set(used)):
        value = getattr(args, name, None)
        if value is not None:
            raise UserError(f"--{name} does not apply to {what}")


SAMPLING_FLAGS = {"sampler", "steps", "guidance_scale", "guidance_schedule", "guidance_interval", "amp"}


def model_of(model, preset):
    """The denoiser a fresh run builds: --model, else its preset's, else the default."""
    return model or PRESETS[preset or "default"].get("model", Config.model)


def build_config(args, base=None):
    """Defaults -> dataset recipe -> model recipe -> preset -> the dataset recipe's settings for
    that preset -> explicit flags. `base` (a saved run's config) replaces all but the flags when
    continuing or sampling from a run."""
    flags = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    _refuse_options_of_other_datasets(flags, flags.get("dataset", base.dataset if base else Config.dataset))
    if base is not None:
        for name, value in flags.items():  # a flag the saved run cannot honour is refused, not ignored
            saved = getattr(base, name)
            if name not in RUNTIME_FIELDS and _plain(value) != _plain(saved):
                flag = FLAGS_OF_FIELDS.get(name, f"--{name}")
                raise UserError(f"the run was trained with {name}={saved!r}, not {flag} {value}; only runtime "
                                f"settings can change when continuing or sampling from it")
        cfg = dataclasses.replace(base, **{k: v for k, v in flags.items() if k in RUNTIME_FIELDS})
        if "guidance_scale" in flags:  # a saved scale stands as it was trained (older runs could save any)
            refuse_untrained_guidance(cfg, cfg.guidance_scale)
        return validate(cfg, new_run=False)
    dataset = flags.get("dataset", Config.dataset)
    preset_name = flags.get("preset", "default")
    model = model_of(flags.get("model"), preset_name)
    recipe = dict(DATASET_RECIPES.get(dataset, {}))
    recipe_under_preset = recipe.pop("presets", {}).get(preset_name, {})
    values = {}
    for layer in (recipe, MODEL_RECIPES.get(model, {}), PRESETS[preset_name], recipe_under_preset, flags):
        values.update(layer)
    values["preset"], values["model"] = preset_name, model
    cfg = Config(**values)
    if cfg.results_dir is None:
        cfg.results_dir = os.path.join("results", f"{cfg.dataset}_{cfg.model}")
    return validate(cfg)


# Fields set by a flag of another name (main.py --train_classifier --epochs sets classifier_epochs).
FLAGS_OF_FIELDS = {f"classifier_{name}": f"--{name} (of --train_classifier)" for name in ("epochs", "lr", "batch_size")}


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


# Fields a saved run's config may have changed on the command line when it is continued or
# sampled from. The rest define the model, or a plan fixed at the start (the classifier's
# one-cycle lr over its epochs and batches), and must match.
RUNTIME_FIELDS = {"results_dir", "data_root", "device", "seed", "download", "amp", "compile", "log_every",
                  "picture_every", "checkpoint_every", "sampler", "steps", "guidance_scale",
                  "guidance_schedule", "guidance_interval", "vae_epochs", "diffusion_epochs", "batch_size",
                  "vae_batch_size", "lr", "vae_lr", "subset", "max_bad_steps", "vgg_weights", "perceptual_weight",
                  "eval_every", "eval_samples", "classifier_path", "patience", "vae_minutes", "diffusion_minutes",
                  "vae_grad_clip"}


def refuse_untrained_guidance(cfg, scale):
    """Guidance mixes in the null label's prediction, which a run without label dropout never trained."""
    if cfg.label_dropout == 0 and scale != 1:
        raise UserError(f"--guidance_scale {scale:g} guides against the null label, which a run with --label_dropout "
                        f"0 never trains: use --guidance_scale 1, or train with label dropout")


def validate(cfg, new_run=True):
    """Ranges and consistency of a config; new_run: also the recipe checks a saved run predates."""
    from data import dataset_names, default_image_size  # late import: data imports nothing from here
    from training.optim import LR_SCHEDULES
    checks = [
        (cfg.dataset in dataset_names(), f"unknown dataset {cfg.dataset!r}; choose from {', '.join(dataset_names())}"),
        (cfg.model in DENOISERS, f"unknown model {cfg.model!r}; choose from {', '.join(DENOISERS)}"),
        *((getattr(cfg, name) in choices, f"unknown --{name} {getattr(cfg, name)!r}; choose {', '.join(choices)}")
          for name, choices in (("schedule", SCHEDULES), ("prediction", PREDICTIONS),
                                ("loss_weighting", LOSS_WEIGHTINGS), ("sampler", SAMPLERS),
                                ("guidance_schedule", GUIDANCE_SCHEDULES), ("vae_lr_schedule", LR_SCHEDULES),
                                ("lr_schedule", LR_SCHEDULES), ("loss", LOSS_TERMS),
                                ("timestep_sampling", TIMESTEP_SAMPLINGS), ("attention", ATTENTION_KINDS),
                                ("amp", AMP_MODES))),
        (cfg.timesteps >= 2, "--timesteps must be at least 2"),
        (1 <= cfg.steps <= cfg.timesteps, f"--steps must be between 1 and {cfg.timesteps}, got {cfg.steps}"),
        (0 <= cfg.guidance_scale <= MAX_GUIDANCE,
         f"--guidance_scale must be between 0 and {MAX_GUIDANCE:g}, got {cfg.guidance_scale}"),
        (cfg.guidance_interval is None or 0 <= cfg.guidance_interval[0] < cfg.guidance_interval[1] < math.inf,
         f"--guidance_interval LO HI needs 0 <= LO < HI and HI finite, got {_plain(cfg.guidance_interval)}"),
        (cfg.batch_size > 0 and cfg.vae_batch_size > 0, "--batch_size must be positive"),
        (all(0 < v <= 1 for v in (cfg.lr, cfg.vae_lr, cfg.classifier_lr)), "--lr must be in (0, 1]"),
        (0 <= cfg.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {cfg.seed}"),
        (cfg.results_dir != "", "--results_dir must not be empty"),
        (cfg.data_root is None or cfg.data_root.strip() != "", "--data_root must not be empty"),
        (min(cfg.log_every, cfg.picture_every, cfg.checkpoint_every, cfg.max_bad_steps) >= 1,
         "--log_every, --picture_every and --checkpoint_every must be at least 1"),
        (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (all(0 <= v < math.inf for v in (cfg.weight_decay, cfg.grad_clip)),
         "--weight_decay and --grad_clip must be finite and not negative"),
        (0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.warmup_steps >= 0, f"--warmup_steps must not be negative, got {cfg.warmup_steps}"),
        (cfg.eval_every >= 0, f"--eval_every must not be negative (0: off), got {cfg.eval_every}"),
        (all(0 <= w < math.inf for w in (cfg.kl_weight, cfg.perceptual_weight, cfg.classifier_weight,
                                         cfg.center_weight, cfg.repulsion_weight, cfg.adv_weight)),
         "loss weights must be finite and not negative"),
        (all(m is None or m >= 0 for m in (cfg.vae_minutes, cfg.diffusion_minutes)),
         "--minutes, --vae_minutes and --diffusion_minutes must be positive (0: no budget)"),
        (cfg.vae_grad_clip >= 0, "--vae_grad_clip must not be negative (0: off)"),
        (cfg.vae_res_blocks >= 0, f"--vae_res_blocks must not be negative, got {cfg.vae_res_blocks}"),
        (min(cfg.vae_epochs, cfg.diffusion_epochs, cfg.classifier_epochs) >= 1,
         "--epochs, --vae_epochs and --diffusion_epochs must be at least 1"),
        (cfg.subset is None or cfg.subset > 0, f"--subset must be positive, got {cfg.subset}"),
        (cfg.image_size is None or cfg.image_size >= 8, f"--image_size must be at least 8, got {cfg.image_size}"),
        (0 <= cfg.val_fraction < 1, f"--val_fraction must be in [0, 1), got {cfg.val_fraction}"),
        (0 <= cfg.label_dropout < 1, "--label_dropout must be in [0, 1)"),
        # x0 = (x_t - sigma eps) / alpha with the cosine schedule's alpha = 5e-5 at the noisiest
        # step turns an eps error of 1e-3 into an x0 error of 20; pixel models clip it to the data
        # range, latents have none (Salimans & Ho 2022, section 4: predict v or x0 there). A new
        # run's recipe only: a saved run, however trained, stays loadable.
        (not new_run or not (cfg.is_latent and cfg.schedule == "cosine" and cfg.prediction == "eps"),
         "--prediction eps with --schedule cosine makes a latent model's samples blow up (alpha is 5e-5 at the "
         "noisiest step, and latents cannot be clipped like pixels): use --prediction v or x0, or --schedule linear"),
        (cfg.patience >= 0, f"--patience must not be negative, got {cfg.patience}"),
        (min(cfg.base_channels, cfg.vae_base_channels, cfg.disc_channels, cfg.latent_channels,
             cfg.transformer_width, cfg.transformer_depth, cfg.transformer_decoder_channels, cfg.classifier_width,
             cfg.num_heads, cfg.transformer_heads) > 0,
         "widths, depths and head counts must be positive"),
        # A zero head count fails the check above; the guards below keep it from dividing by zero.
        (cfg.model in TRANSFORMER_DENOISERS or not cfg.attention_resolutions or cfg.num_heads <= 0
         or cfg.base_channels % cfg.num_heads == 0,
         f"--base_channels {cfg.base_channels} does not split into {cfg.num_heads} attention heads"),
        (cfg.model not in TRANSFORMER_DENOISERS or cfg.transformer_heads <= 0
         or cfg.transformer_width % cfg.transformer_heads == 0,
         f"--transformer_width {cfg.transformer_width} does not split into {cfg.transformer_heads} heads"),
        (cfg.model not in TRANSFORMER_DENOISERS or cfg.transformer_width % 4 == 0,
         f"--transformer_width {cfg.transformer_width} must be a multiple of 4 (2-D sin-cos positions)"),
        (cfg.patch_size > 0, f"--patch_size must be positive, got {cfg.patch_size}"),
        (cfg.eval_samples >= 2, f"--eval_samples must be at least 2 (KID compares pairs), got {cfg.eval_samples}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if new_run:
        refuse_untrained_guidance(cfg, cfg.guidance_scale)
    cfg.image_size = cfg.image_size or default_image_size(cfg.dataset)
    if cfg.image_size is not None and cfg.is_latent and cfg.image_size % cfg.vae_downsampling:
        raise UserError(f"--image_size {cfg.image_size} is not divisible by the VAE's downsampling")
    what = f"the {cfg.denoiser_size}x{cfg.denoiser_size} {'latent' if cfg.is_latent else 'image'}"
    if cfg.image_size is not None and cfg.model in TRANSFORMER_DENOISERS and cfg.denoiser_size % cfg.patch_size:
        raise UserError(f"--patch_size {cfg.patch_size} does not divide {what}")
    unet = cfg.model not in TRANSFORMER_DENOISERS
    if cfg.image_size is not None and unet and cfg.denoiser_size % cfg.unet_downsampling:
        raise UserError(f"--image_size {cfg.image_size}: the UNet halves {what} {len(cfg.channel_mults) - 1} "
                        f"times, so its side must be divisible by {cfg.unet_downsampling}")
    return cfg


def write_json(obj, path):
    """Through a temporary file and a rename: a crash leaves the old file or the new, never half.
    NaN and infinities (a class with no samples) are written as null: strict JSON has no NaN."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_finite_or_none(obj), f, indent=2, allow_nan=False)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def save_config(cfg, path):
    write_json(cfg.to_dict(), path)

