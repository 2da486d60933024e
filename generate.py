"""Sample from a trained run: images per class, animations of the reverse process,
evaluation (--evaluate) and classification with the denoiser itself (--classify)."""
import os
import sys

import torch

from config import (SAMPLING_FLAGS, SWITCH, ArgumentParser, add_common_args, add_sampling_args, build_config,
                    positive_int, refuse_unused_flags)
from data import safe_name
from errors import UserError, run_main

# What each action reads beyond the run and the device: any other flag is refused.
ACTION_FLAGS = {
    "sampling": {"class_name", "num_samples", "batch_size", "seed", "output_dir"} | SAMPLING_FLAGS,
    "--create_animation": {"class_name", "seed", "output_dir"} | SAMPLING_FLAGS,
    "--evaluate": {"num_samples", "batch_size", "seed", "output_dir", "data_root", "inception_weights", "no_fid",
                   "classifier_path", "classify_images"} | SAMPLING_FLAGS,
    "--classify": {"num_samples", "seed", "output_dir", "data_root", "amp"},
}


def parse_args(argv=None):
    p = ArgumentParser(prog="generate.py", description=__doc__)
    p.add_argument("--model_path", help="a denoiser checkpoint (instead of --results_dir)")
    p.add_argument("--class_name", help="class to sample or animate, or 'all' (default)")
    p.add_argument("--num_samples", type=positive_int,
                   help="images per class (default 10); with --evaluate the total, balanced over classes "
                        "(default 2000); with --classify the held-out images to classify (default 200)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--create_animation", **SWITCH, help="GIF of one reverse-diffusion run")
    action.add_argument("--evaluate", **SWITCH, help="compute every metric and write eval.json")
    action.add_argument("--classify", **SWITCH, help="classify held-out real images with the denoiser")
    p.add_argument("--output_dir", help="where the results go (default <results_dir>/generated for images, "
                                        "<results_dir> for the rest)")
    p.add_argument("--inception_weights", help="path to pt_inception-2015-12-05-6726825d.pth for FID/KID")
    p.add_argument("--no_fid", **SWITCH, help="--evaluate without the Inception metrics")
    p.add_argument("--classifier_path", help="real-data classifier (default results/<dataset>_classifier/...)")
    p.add_argument("--classify_images", type=int,
                   help="--evaluate: held-out images for the diffusion classifier (default 100 with up to "
                        "10 classes, else 0)")
    add_common_args(p, without=("subset", "download"))  # sampling and scoring read neither
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.no_fid and args.inception_weights is not None:
        raise UserError("--inception_weights does not apply with --no_fid, which skips the Inception metrics")
    if args.classify_images is not None and args.classify_images < 0:
        raise UserError(f"--classify_images must not be negative, got {args.classify_images}")
    if args.class_name is not None and not args.class_name.strip():
        raise UserError("--class_name is empty: give a class name, or 'all' for every class")
    action = ("--evaluate" if args.evaluate else "--classify" if args.classify
              else "--create_animation" if args.create_animation else "sampling")
    policed = set().union(*ACTION_FLAGS.values())
    refuse_unused_flags(args, ACTION_FLAGS[action], policed, action)
    if args.results_dir is not None and args.model_path is not None:  # README: one or the other
        raise UserError("give --model_path or --results_dir, not both: --model_path samples a checkpoint file "
                        "instead of a run folder; --output_dir says where the results go")
    if args.results_dir is None and args.model_path is None:  # README's default run folder
        args.results_dir = build_config(args).results_dir
    return args


def main(argv=None):
    from pipeline import load_pipeline
    from training.run import writable_folder
    from training.loop import select_device
    from viz import figures
    args = parse_args(argv)
    device = select_device(args.device)
    pipe = load_pipeline(args.results_dir, args.model_path, device, overrides=args)
    run_dir = args.results_dir or os.path.dirname(os.path.abspath(args.model_path))
    out = args.output_dir or (os.path.join(run_dir, "generated") if not (args.evaluate or args.classify or
                                                                        args.create_animation) else run_dir)
    writable_folder(out)  # before any sampling: a read-only run folder fails here, not at the first save
    seed = pipe.cfg.seed if args.seed is None else args.seed
    if args.evaluate:
        from evaluation.evaluate import evaluate_run
        if args.classify_images is None:
            args.classify_images = 100 if pipe.num_classes <= 10 else 0
        evaluate_run(pipe, run_dir, args, seed, out_dir=out)
        return 0
    if args.classify:
        from evaluation.evaluate import classify_run
        classify_run(pipe, out, args, seed)
        return 0
    class_name = args.class_name or "all"
    classes = list(range(pipe.num_classes)) if class_name.lower() == "all" else [pipe.class_index(class_name)]
    if args.create_animation:
        for c in figures.pick_classes(pipe.class_names) if len(classes) > 10 else classes:  # a spread of many
            path = os.path.join(out, f"diffusion_animation_{safe_name(pipe.class_names[c])}.gif")
            figures.denoising_animation(pipe, c, path, seed=seed)
            print(path)
        return 0
    per_class = args.num_samples or 10
    for c in classes:
        name = safe_name(pipe.class_names[c])
        images = pipe.sample_batched(torch.full((per_class,), c), batch_size=args.batch_size or 256, seed=seed)
        figures.save_grid(images, os.path.join(out, f"{name}_grid.png"), nrow=min(10, per_class))
        figures.save_individual(images, os.path.join(out, name), name)
        print(f"{pipe.class_names[c]}: {per_class} image{'s' if per_class != 1 else ''} in {os.path.join(out, name)}, "
              f"grid {os.path.join(out, name + '_grid.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
