"""Pictures of a trained run by --mode (written into the run's folder)."""
import math
import os
import sys

import torch

from config import (SAMPLING_FLAGS, ArgumentParser, add_common_args, add_sampling_args, build_config, positive_int,
                    refuse_unused_flags)
from errors import UserError, run_main

# What each mode reads beyond the run, its data and the device: any other flag is refused.
MODE_FLAGS = {
    "latent_space": {"classes", "seed", "data_root"},
    "samples_grid": {"classes", "num_samples", "seed"} | SAMPLING_FLAGS,
    "denoising_steps": {"class_name", "seed"} | SAMPLING_FLAGS,
    "reconstructions": {"data_root"},
    "loss_curves": set(),
    "forward_process": {"class_name", "seed", "data_root"},
    "steps_comparison": {"class_name", "seed"} | SAMPLING_FLAGS,
    "denoising_path": {"class_name", "classes", "num_samples", "seed", "data_root"} | SAMPLING_FLAGS,
}
MODES = tuple(MODE_FLAGS)


def parse_args(argv=None):
    p = ArgumentParser(prog="visualize.py", description=__doc__)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--model_path", help="a denoiser checkpoint (instead of --results_dir)")
    p.add_argument("--class_name", help="class for the single-class modes (default: the first)")
    p.add_argument("--classes", nargs="+", help="classes to show (default: all, or a spread of 10)")
    p.add_argument("--num_samples", type=positive_int, help="images per class or paths (default 8)")
    add_common_args(p, without=("batch_size", "subset", "download"))  # no mode reads them
    add_sampling_args(p)
    args = p.parse_args(argv)
    policed = set().union(*MODE_FLAGS.values())
    refuse_unused_flags(args, MODE_FLAGS[args.mode], policed, f"--mode {args.mode}")
    if args.class_name is not None and not args.class_name.strip():
        raise UserError("--class_name is empty: give a class name")
    if args.results_dir is not None and args.model_path is not None:  # README: one or the other
        raise UserError("give --model_path or --results_dir, not both: with --model_path the pictures go "
                        "beside the checkpoint file (copy it into the folder they should go to)")
    args.num_samples = args.num_samples or 8
    if args.results_dir is None and args.model_path is None:  # README's default run folder
        args.results_dir = build_config(args).results_dir
    return args


def main(argv=None):
    from data import safe_name
    from viz import figures
    args = parse_args(argv)
    run_dir = args.results_dir or os.path.dirname(os.path.abspath(args.model_path))
    if not os.path.isdir(run_dir):
        raise UserError(f"results folder {run_dir} does not exist; give --results_dir of a trained run")
    from training.run import writable_folder
    writable_folder(run_dir, "results folder")  # every mode writes its picture there: fail before the work
    out = lambda name: os.path.join(run_dir, name)  # noqa: E731
    if args.mode == "loss_curves":
        from training.run import Run
        _refuse_flags_the_run_was_not_trained_with(args, run_dir)
        run = Run(run_dir)
        written = [p for stage, name in (("vae_gan", "autoencoder_losses.png"),
                                         ("conditional_diffusion", "diffusion_loss.png"),
                                         ("classifier", "classifier_losses.png"))
                   if figures.plot_losses(run, stage, p := out(name))]
        if not written:
            raise UserError(f"{run_dir} has no metrics.csv with training losses yet")
        print("\n".join(written))
        return 0
    if args.mode == "reconstructions":
        return _reconstructions(args, run_dir, out)
    from pipeline import load_pipeline
    from training.loop import select_device
    device = select_device(args.device)
    pipe = load_pipeline(args.results_dir, args.model_path, device, overrides=args)
    seed = pipe.cfg.seed if args.seed is None else args.seed
    label = pipe.class_index(args.class_name) if args.class_name else 0
    name = safe_name(pipe.class_names[label])
    classes = [pipe.class_index(c) for c in args.classes] if args.classes else None
    if args.mode == "samples_grid":
        path = out("samples_grid.png")
        figures.class_sample_grid(pipe, path, per_class=args.num_samples, seed=seed, classes=classes)
    elif args.mode == "denoising_steps":
        path = out(f"denoising_steps_{name}.png")
        figures.denoising_steps_figure(pipe, label, path, seed=seed)
    elif args.mode == "steps_comparison":
        path = out(f"steps_comparison_{name}.png")
        # --steps N: N/8, N/4, N/2 and N steps (the default 5, 10, 20, 40 is N = 40)
        counts = sorted({max(1, (args.steps or 40) // d) for d in (8, 4, 2, 1)})
        figures.steps_comparison_figure(pipe, label, path, seed=seed, step_counts=tuple(counts),
                                        samplers=(args.sampler,) if args.sampler else ("ddim", "dpmpp", "ddpm"))
    elif args.mode == "forward_process":
        images, labels = _held_out(pipe.cfg)
        pick = (labels == label).nonzero().flatten()
        if not len(pick):
            raise UserError(f"no held-out image of class {pipe.class_names[label]} to noise")
        path = out("forward_process.png")
        figures.forward_process_figure(pipe.schedule, images[pick[0]], path, seed=seed,
                                       latent=pipe.vae is not None)  # the title says what is noised
    elif args.mode in ("latent_space", "denoising_path"):
        if pipe.vae is None:
            raise UserError(f"--mode {args.mode} needs a latent model; {run_dir} holds a pixel-space "
                            f"{pipe.cfg.model}")
        images, labels = _held_out(pipe.cfg, limit=2000)
        latents = pipe.to_model_space(images).cpu()
        if classes is None and pipe.num_classes > 10:  # many classes: a readable spread, not a blur of 102
            classes = figures.pick_classes(pipe.class_names)
        if classes is not None and args.mode == "denoising_path" and label not in classes:
            classes = [*classes, label]  # the sampled class's own latents belong under its paths
        if classes is not None:
            keep = torch.isin(labels, torch.tensor(classes))
            latents, labels = latents[keep], labels[keep]
        if len(latents) < 2:  # PCA needs two points; refused before any sampling
            raise UserError(f"--mode {args.mode} needs at least 2 held-out images of the classes it shows, found "
                            f"{len(latents)}{'; add --classes' if args.classes else ''}")
        if args.mode == "latent_space":
            path = out("latent_space.png")
            figures.latent_space_figure(latents, labels, pipe.class_names, _centers(pipe), path, seed=seed)
        else:
            path = out(f"denoising_path_{name}.png")
            figures.denoising_path_figure(pipe, label, latents, labels, path, num_samples=args.num_samples,
                                          seed=seed)
    print(path)
    return 0


def _refuse_flags_the_run_was_not_trained_with(args, run_dir):
    """For the one mode that loads no checkpoint, what the others do with theirs: a flag that
    differs from how the run was trained is refused (against its denoiser's or VAE's config:
    config.json holds whichever stage trained last)."""
    from pipeline import DENOISER_FILES, VAE_FILES, config_of_saved_run
    config_of_saved_run(args, run_dir, DENOISER_FILES + VAE_FILES, "--mode loss_curves")


def _held_out(cfg, limit=None):
    from data import load_dataset
    val = load_dataset(cfg.dataset, cfg.data_root, "val", cfg.image_size, val_fraction=cfg.val_fraction,
                       attribute=cfg.attribute, flowers_splits=cfg.flowers_splits)
    return val.images[:limit], val.labels[:limit]


def _centers(pipe):
    """The VAE's learned class centers, in the denoiser's standardized latent space; None (the
    figure goes without) for a checkpoint with no VAE stage beside it."""
    from pipeline import VAE_FILES, first_file, load_vae_state, require_parts
    folder = os.path.dirname(pipe.checkpoint_path)
    if first_file(folder, VAE_FILES) is None:
        print(f"note: no VAE checkpoint beside {pipe.checkpoint_path}: the figure has no class centers",
              file=sys.stderr)
        return None
    state, path = load_vae_state(folder, pipe.cfg)  # refuse another run's VAE
    require_parts(state.get("stage"), ("center_loss",), path, "VAE")
    require_parts(state["stage"]["center_loss"], ("centers",), path, "VAE (center_loss)")
    centers = state["stage"]["center_loss"]["centers"]
    shape = (pipe.num_classes,) + pipe.sample_shape
    if not isinstance(centers, torch.Tensor) or centers.numel() != math.prod(shape):
        raise UserError(f"{path}: its class centers do not fit the {pipe.num_classes} classes and "
                        f"{'x'.join(map(str, pipe.sample_shape))} latents of {pipe.checkpoint_path}")
    centers = centers.to(pipe.device)
    return ((centers.view(shape) - pipe.latent_shift) / pipe.latent_scale).flatten(1).cpu().numpy()


def _reconstructions(args, run_dir, out):
    """The run's VAE stage; with --model_path, or in a folder with a denoiser but no VAE stage,
    the VAE inside the denoiser checkpoint."""
    from config import Config
    from models import build_vae
    from pipeline import (DENOISER_FILES, VAE_FILES, first_file, load_pipeline, load_vae_state, load_weights,
                          require_parts)
    from training.loop import select_device
    from viz import figures
    device = select_device(args.device)
    if args.model_path or (first_file(run_dir, VAE_FILES) is None and first_file(run_dir, DENOISER_FILES)):
        pipe = load_pipeline(args.results_dir, args.model_path, device, overrides=args)
        if pipe.vae is None:
            raise UserError(f"--mode reconstructions needs a latent model; {pipe.checkpoint_path} is a "
                            f"pixel-space {pipe.cfg.model}")
        cfg, class_names, vae = pipe.cfg, pipe.class_names, pipe.vae
    else:
        state, path = load_vae_state(run_dir)
        require_parts(state.get("stage"), ("class_names", "vae"), path, "VAE")
        cfg = build_config(args, base=Config.from_dict(state["config"]))  # as the other modes: runtime flags only
        class_names = state["stage"]["class_names"]
        vae = build_vae(cfg, len(class_names), cfg.image_size)
        load_weights(vae, state["stage"]["vae"], path, "VAE")
        vae.to(device)
    images, labels = _held_out(cfg, limit=2000)
    target = out("reconstructions.png")
    figures.reconstruction_grid(vae, images, labels, class_names, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
