"""Pictures of a trained run by --mode (written into the run's folder)."""
import os
import sys

import torch

from config import ArgumentParser, add_common_args, add_sampling_args
from errors import UserError, run_main

MODES = ("latent_space", "samples_grid", "denoising_steps", "reconstructions", "loss_curves",
         "forward_process", "steps_comparison", "denoising_path")


def parse_args(argv=None):
    p = ArgumentParser(prog="visualize.py", description=__doc__)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--model_path", help="a denoiser checkpoint (instead of --results_dir)")
    p.add_argument("--class_name", help="class for the single-class modes (default: the first)")
    p.add_argument("--classes", nargs="+", help="classes to show (default: all, or a spread of 10)")
    p.add_argument("--num_samples", type=int, default=8, help="images per class or paths (default 8)")
    add_common_args(p)
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.num_samples <= 0:
        raise UserError(f"--num_samples must be positive, got {args.num_samples}")
    return args


def main(argv=None):
    from data import safe_name
    from viz import figures
    args = parse_args(argv)
    run_dir = args.results_dir or (os.path.dirname(os.path.abspath(args.model_path)) if args.model_path else None)
    if run_dir is None or not os.path.isdir(run_dir):
        raise UserError(f"results folder {run_dir} does not exist; give --results_dir of a trained run")
    out = lambda name: os.path.join(run_dir, name)  # noqa: E731
    if args.mode == "loss_curves":
        from training.run import Run
        run = Run(run_dir, create=False)
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
        figures.steps_comparison_figure(pipe, label, path, seed=seed,
                                        samplers=(args.sampler,) if args.sampler else ("ddim", "dpmpp", "ddpm"))
    elif args.mode == "forward_process":
        images, labels = _held_out(pipe.cfg)
        pick = (labels == label).nonzero().flatten()
        path = out("forward_process.png")
        figures.forward_process_figure(pipe.schedule, images[pick[0] if len(pick) else 0], path, seed=seed)
    elif args.mode in ("latent_space", "denoising_path"):
        if pipe.vae is None:
            raise UserError(f"--mode {args.mode} needs a latent model; {run_dir} holds a pixel-space "
                            f"{pipe.cfg.model}")
        images, labels = _held_out(pipe.cfg, limit=2000)
        latents = pipe.to_model_space(images).cpu()
        if classes is None and pipe.num_classes > 10:  # many classes: a readable spread, not a blur of 102
            classes = figures.pick_classes(pipe.class_names)
            classes += [label] if args.mode == "denoising_path" and label not in classes else []
        if classes is not None:
            keep = torch.isin(labels, torch.tensor(classes))
            latents, labels = latents[keep], labels[keep]
        if args.mode == "latent_space":
            path = out("latent_space.png")
            figures.latent_space_figure(latents, labels, pipe.class_names, _centers(pipe), path, seed=seed)
        else:
            path = out(f"denoising_path_{name}.png")
            figures.denoising_path_figure(pipe, label, latents, labels, path, num_samples=args.num_samples,
                                          seed=seed)
    print(path)
    return 0


def _held_out(cfg, limit=None):
    from data import load_dataset
    val = load_dataset(cfg.dataset, cfg.data_root, "val", cfg.image_size, val_fraction=cfg.val_fraction,
                       attribute=cfg.attribute, flowers_splits=cfg.flowers_splits)
    return val.images[:limit], val.labels[:limit]


def _centers(pipe):
    """The VAE's learned class centers, in the denoiser's standardized latent space."""
    from pipeline import load_vae_state
    state, _ = load_vae_state(os.path.dirname(pipe.checkpoint_path), pipe.cfg)  # refuse another run's VAE
    centers = state["stage"]["center_loss"]["centers"].to(pipe.device)
    shape = (len(centers),) + pipe.sample_shape
    return ((centers.view(shape) - pipe.latent_shift) / pipe.latent_scale).flatten(1).cpu().numpy()


def _reconstructions(args, run_dir, out):
    from config import Config
    from models import build_vae
    from pipeline import load_vae_state
    from training.loop import select_device
    from viz import figures
    state, _ = load_vae_state(run_dir)
    cfg = Config.from_dict(state["config"])
    if args.data_root:
        cfg.data_root = args.data_root
    class_names = state["stage"]["class_names"]
    vae = build_vae(cfg, len(class_names), cfg.image_size)
    vae.load_state_dict(state["stage"]["vae"])
    vae.to(select_device(args.device))
    images, labels = _held_out(cfg, limit=2000)
    target = out("reconstructions.png")
    figures.reconstruction_grid(vae, images, labels, class_names, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
