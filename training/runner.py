"""What `main.py` runs: each stage's data, model and loop, with resume and final files."""
import os
import sys

import torch

from config import Config, build_config
from data import load_dataset, split_digest
from data.batcher import DeviceBatcher
from errors import UserError
from training import distributed as dist
from training.checkpoint import check_compatible, copy_checkpoint, load_checkpoint
from training.denoiser import HELDOUT_SEED
from training.loop import fit, rng_state, seed_everything, select_device
from training.run import Run, writable_folder


def load_split(cfg, split):
    """One split of the configured dataset (train: --subset of it, when given)."""
    data = load_dataset(cfg.dataset, cfg.data_root, split, cfg.image_size, download=cfg.download,
                        subset=cfg.subset if split == "train" else None, val_fraction=cfg.val_fraction,
                        attribute=cfg.attribute, flowers_splits=cfg.flowers_splits)
    if split == "train" and cfg.subset and cfg.subset > len(data) and dist.is_main():
        print(f"note: --subset {cfg.subset} is more than the {len(data)} training images: all of them are used",
              file=sys.stderr)
    return data


def load_splits(cfg):
    """The training split and the held-out validation split of the configured dataset, the same on
    every rank (a copy that differs between machines would mismatch the collectives, or train on
    other images unnoticed)."""
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    if dist.enabled():
        read = dist.gather_objects([split_digest(s.images, s.labels) for s in (train, val)])
        if any(digests != read[0] for digests in read):
            raise UserError(f"the processes read different images from {cfg.data_root or cfg.dataset} (ranks "
                            f"{', '.join(str(r) for r, d in enumerate(read) if d != read[0])} differ from rank 0): "
                            f"give every process the same data")
    return train, val


EPOCHS_FIELD = {"vae_gan": "vae_epochs", "conditional_diffusion": "diffusion_epochs", "classifier": "classifier_epochs"}


def resume_state_for(cfg, stage_cls, resume, checkpoint_path=None):
    """The checkpoint to continue from, or None for a fresh start. With --resume a stage that
    has no checkpoint yet starts fresh; without it, a fresh start never overwrites one."""
    path = checkpoint_path or os.path.join(cfg.results_dir, stage_cls.last_name)
    if checkpoint_path and not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist")
    own = os.path.join(cfg.results_dir, stage_cls.last_name)
    if checkpoint_path and os.path.isfile(own) and not os.path.samefile(own, path):
        raise UserError(f"{cfg.results_dir} already holds another run's {stage_cls.last_name}: continue "
                        f"{checkpoint_path} into a fresh --results_dir")
    if (resume or checkpoint_path) and os.path.isfile(path):
        from pipeline import require_parts
        state = load_checkpoint(path)
        check_compatible(state, cfg, stage_cls.kind, path)
        require_parts(state, ("epoch", "step", "rng", "stage"), path, f"{stage_cls.kind} training")
        asked, done = getattr(cfg, EPOCHS_FIELD[stage_cls.kind]), state["epoch"]
        if resume and asked < done:  # refused before the data are read and config.json is rewritten
            raise UserError(f"{path} has trained {done} epochs, more than the {asked} asked for (--epochs; with "
                            f"--train_all, --vae_epochs or --diffusion_epochs): ask for {done} or more")
        return _own_rng_stream(state, cfg)
    if not resume and os.path.isfile(path):
        raise UserError(f"{cfg.results_dir} already holds {stage_cls.last_name}; pass --resume to continue "
                        f"it, or choose another --results_dir")
    # A fresh start of this stage would overwrite what an earlier run of it left (its _last.pt gone).
    left = [name for name in stage_cls.saved_names if os.path.isfile(os.path.join(cfg.results_dir, name))]
    if left:
        raise UserError(f"{cfg.results_dir} holds {', '.join(left)} but no {stage_cls.last_name} to "
                        f"{'resume' if resume else 'continue'}: a fresh start would overwrite them; move them "
                        f"away or choose another --results_dir")
    return None


def check_folder_holds_this_run(cfg):
    """A stage starting in a folder must not mix into another run's: the VAE and denoiser
    checkpoints there must be of the same data and image size, and of the same kind of model (a
    latent denoiser may follow a VAE trained under another latent --model: they share it).
    config.json is no guide: each stage rewrites it."""
    from pipeline import DENOISER_FILES, VAE_FILES, first_file
    for names in (VAE_FILES, DENOISER_FILES):
        path = first_file(cfg.results_dir, names)
        if path is None:
            continue
        theirs = Config.from_dict(load_checkpoint(path)["config"])
        size_differs = None not in (theirs.image_size, cfg.image_size) and theirs.image_size != cfg.image_size
        if (theirs.dataset, theirs.is_latent) != (cfg.dataset, cfg.is_latent) or size_differs:
            raise UserError(f"{cfg.results_dir} holds {os.path.basename(path)} of --model {theirs.model} on --dataset "
                            f"{theirs.dataset} at --image_size {theirs.image_size}, not --model {cfg.model} on "
                            f"{cfg.dataset} at {cfg.image_size}: choose another --results_dir")


def _model_stage_state(cfg, stage_cls, resume, checkpoint_path):
    """resume_state_for, plus the folder check for a VAE or denoiser stage that starts fresh or
    continues another folder's checkpoint (a stage resumed in its own folder is that folder's run)."""
    state = resume_state_for(cfg, stage_cls, resume, checkpoint_path)
    if state is None or checkpoint_path:
        check_folder_holds_this_run(cfg)
    return state


def _own_rng_stream(state, cfg):
    """Each rank resumes its own RNG stream where the checkpoint holds every rank's (a _last.pt
    written by as many processes as now run), so a resume under torchrun is exact. Otherwise
    (another process count, or a _best.pt) rank 0 (and a single process) takes the saved state and
    other ranks a stream of their own, seeded from (seed, rank, step): restoring rank 0's state
    everywhere would give all ranks the same noise, timesteps and dropout masks."""
    rank_rngs = state.get("rank_rngs")
    if rank_rngs is not None and len(rank_rngs) == dist.world_size():
        state["rng"] = rank_rngs[dist.rank()]
    elif dist.rank() > 0:
        seed_everything(hash((cfg.seed, dist.rank(), state["step"])) % 2 ** 63)
        state["rng"] = rng_state()
    return state


def config_for_resume(args, checkpoint_path, default_results_dir=None, with_kind=False):
    """A resumed run keeps its saved config; the command line may change runtime fields only.
    With --total_epochs, the stage's epoch count becomes that target (so config.json says it).
    with_kind: also return the checkpoint's kind (the stage it continues)."""
    state = load_checkpoint(checkpoint_path)
    try:
        cfg = build_config(args, base=Config.from_dict(state["config"]))
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read the config inside {checkpoint_path}: {e}") from None
    if args.results_dir is None:
        cfg.results_dir = default_results_dir or os.path.dirname(os.path.abspath(checkpoint_path))
    field = EPOCHS_FIELD.get(state["kind"]) if state["kind"] != "classifier" else None  # --total_epochs: VAE or denoiser
    if field and getattr(args, "total_epochs", None) is not None:
        if args.total_epochs <= state.get("epoch", 0):
            done = state["epoch"]
            raise UserError(f"--total_epochs {args.total_epochs}: {checkpoint_path} has already trained {done} "
                            f"epoch{'s' if done != 1 else ''}; give more to train on")
        setattr(cfg, field, args.total_epochs)
    return (cfg, state["kind"]) if with_kind else cfg


def config_for_saved_run(args, stages, stage=None):
    """--resume: the run's own config, with only runtime fields changed by flags: that inside the
    `stage` checkpoint (by default the first of `stages` there is) when there is one (each stage
    rewrites config.json, so after a later stage it holds that stage's settings), else the
    folder's config.json."""
    from pipeline import config_of_saved_run, first_file
    folder = args.results_dir or build_config(args).results_dir
    if first_file(folder, stages) is None:
        raise UserError(f"--resume: nothing to resume in {folder} (no {' or '.join(stages)})")
    cfg, source = config_of_saved_run(args, folder, [stage] if stage else stages, "--resume")
    if cfg is None:
        raise UserError(f"--resume: cannot read the run's config in {source}: there is no such file")
    cfg.results_dir = folder
    return cfg


def _start(cfg):
    device = select_device(cfg.device)
    if device.type == "cpu" and cfg.amp == "fp16" and dist.is_main():
        print("note: --amp fp16 on a CPU is emulated, often many times slower than --amp bf16 or none",
              file=sys.stderr)
    dist.setup(device)
    seed_everything(cfg.seed + dist.rank())
    if dist.is_main():  # refused now, not after loading and encoding the data; made by fit()
        writable_folder(cfg.results_dir, "results folder", create=False)
    return device, Run(cfg.results_dir)


def train_vae(cfg, resume=False, checkpoint_path=None, total_epochs=None):
    from training.vae_gan import VAEGANStage
    device, run = _start(cfg)
    state = _model_stage_state(cfg, VAEGANStage, resume, checkpoint_path)
    train, val = load_splits(cfg)
    stage = VAEGANStage(cfg, len(train.class_names), cfg.image_size, device, val, run, train.class_names)
    batcher = DeviceBatcher(train.images, train.labels, dist.per_rank_batch_size(cfg.vae_batch_size), device,
                            flip=cfg.hflip, seed=cfg.seed, rank=dist.rank(), world_size=dist.world_size())
    fit(stage, batcher, cfg, run, total_epochs or cfg.vae_epochs, state, max_minutes=cfg.vae_minutes)
    return run


def _latent_data(cfg, device, train, val, resumed=None):
    """Encode the training images (and, with hflip, their mirror images) once with the trained
    VAE; batches then hold (mean, logvar) so each step draws a fresh posterior sample. `resumed` (a
    denoiser checkpoint's stage): its own VAE and standardization, whatever the folder's VAE is now
    (it may have been trained on, or the run continues into another --results_dir)."""
    from models import build_vae
    from pipeline import encode_images, load_vae_state
    from training.denoiser import latent_standardization
    if resumed is not None:
        weights, path = resumed["vae"], "the denoiser checkpoint's VAE"
    else:
        state, path = load_vae_state(cfg.results_dir, cfg)
        weights = state["stage"]["vae"]
    vae = build_vae(cfg, len(train.class_names), cfg.image_size)
    vae.load_state_dict(weights)
    vae.to(device).eval().requires_grad_(False)
    views = (False, True) if cfg.hflip else (False,)
    if dist.is_main():
        print(f"encoding {len(train.images)} training images{' (and mirrors)' if cfg.hflip else ''} with {path}",
              file=sys.stderr)
    encoded = [encode_images(vae, train.images, device, flip=flip) for flip in views]
    latents = torch.cat([torch.cat([mean, logvar], 1) for mean, logvar in encoded])
    labels = train.labels.repeat(len(views))
    # Standardize what the denoiser sees: posterior samples, not means (a barely trained VAE
    # has wide posteriors).
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    sample = lambda m, lv: m + torch.randn(m.shape, generator=g).to(m.device) * torch.exp(0.5 * lv)  # noqa: E731
    shift, scale = latent_standardization(torch.cat([sample(mean, logvar) for mean, logvar in encoded]))
    if resumed is not None:
        shift, scale = resumed["latent_shift"].to(shift.device), resumed["latent_scale"].to(scale.device)
    val_mean, val_logvar = encode_images(vae, val.images, device)
    # The held-out latents from a generator of their own: --seed and --subset (which move g's
    # stream) may change on resume, and the best checkpoint is chosen on these.
    g = torch.Generator(device="cpu").manual_seed(HELDOUT_SEED)
    return vae, latents, labels, shift, scale, (sample(val_mean, val_logvar) - shift) / scale


def train_diffusion(cfg, resume=False, checkpoint_path=None, total_epochs=None):
    from data import to_float
    from training.denoiser import DenoiserStage
    device, run = _start(cfg)
    state = _model_stage_state(cfg, DenoiserStage, resume, checkpoint_path)
    train, val = load_splits(cfg)
    per_rank = dist.per_rank_batch_size(cfg.batch_size)
    heldout_digest = split_digest(val.images, val.labels)  # scores and resumes check the data against it
    if cfg.is_latent:
        vae, latents, labels, shift, scale, val_x = _latent_data(cfg, device, train, val,
                                                                 state["stage"] if state is not None else None)
        batcher = DeviceBatcher(latents, labels, per_rank, device, flip=False, seed=cfg.seed,
                                rank=dist.rank(), world_size=dist.world_size())
        shape = latents.shape[1:]
        shape = (shape[0] // 2,) + tuple(shape[1:])
        stage = DenoiserStage(cfg, train.class_names, shape, device, val_x, val.labels, run, vae, shift, scale,
                              heldout_digest=heldout_digest)
    else:
        batcher = DeviceBatcher(train.images, train.labels, per_rank, device, flip=cfg.hflip, seed=cfg.seed,
                                rank=dist.rank(), world_size=dist.world_size())
        stage = DenoiserStage(cfg, train.class_names, train.images.shape[1:], device, to_float(val.images),
                              val.labels, run, heldout_digest=heldout_digest)
    fit(stage, batcher, cfg, run, total_epochs or cfg.diffusion_epochs, state, max_minutes=cfg.diffusion_minutes)
    if dist.is_main():  # the finished run's sampling checkpoint (full state, EMA inside)
        copy_checkpoint(run.path(stage.last_name), run.path(stage.final_name))
        print(f"[{stage.kind}] for sampling: {run.path(stage.final_name)}")
    dist.barrier()
    return run
