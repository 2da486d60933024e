"""Sampling settings of one trained run, side by side: the offline metrics (sample accuracy, Frechet
distance and KID in the real-data classifier's features) for every sampler:steps and guidance scale
asked for, on the same labels and seeds, with the real features computed once.

    python bench/sampling_sweep.py --results_dir RUN --samplers dpmpp:20,ddim:50 --guidance 1,2,3 \
        [--guidance_schedules constant,linear] [--guidance_intervals all,0.3:5] --num_samples 2000 \
        --out bench/results/NAME.json

Writes the JSON and, beside it under the same name, a plot of accuracy, FD and KID against the
guidance scale.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import (AMP_MODES, DEVICES, MAX_GUIDANCE, ArgumentParser, positive_int,  # noqa: E402
                    refuse_untrained_guidance, write_json)
from errors import UserError, run_main  # noqa: E402
from data import to_uint8  # noqa: E402
from diffusion.guidance import GUIDANCE_SCHEDULES  # noqa: E402
from diffusion.samplers import SAMPLERS  # noqa: E402
from evaluation.evaluate import (OfflineMetrics, balanced_labels, check_heldout_classes,  # noqa: E402
                                 check_sample_count, load_real_classifier)
from pipeline import load_pipeline  # noqa: E402
from training.loop import select_device  # noqa: E402
from training.optim import amp_dtype  # noqa: E402
from training.run import commit_label, device_name, writable_output  # noqa: E402
from viz.figures import sweep_figure  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results_dir", required=True)
    p.add_argument("--samplers", default="dpmpp:20", help="comma-separated sampler:steps")
    p.add_argument("--guidance", default="2", help="comma-separated guidance scales")
    p.add_argument("--guidance_schedules", help="comma-separated guidance schedules (default: the run's)")
    p.add_argument("--guidance_intervals",
                   help="comma-separated noise-level intervals LO:HI of sigma/alpha to guide in, or 'all' "
                        "(default: the run's)")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--batch_size", type=positive_int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier_path")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--no_ema", action="store_true", help="sample with the raw weights instead of the EMA")
    p.add_argument("--amp", choices=AMP_MODES, help="sampling precision (default: the run's)")
    p.add_argument("--out", help="JSON file (default <results_dir>/sampling_sweep.json); its plot goes beside it, "
                                 ".png for .json; it replaces an earlier sweep's report, never another file")
    return p.parse_args(argv)


def sampler_specs(text):
    """'dpmpp:20,ddim:50' -> [("dpmpp", 20), ("ddim", 50)]; anything else is bad input."""
    specs = []
    for spec in text.split(","):
        sampler, _, steps = spec.partition(":")
        if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"--samplers: {spec!r} is not sampler:steps with sampler {', '.join(SAMPLERS)}")
        specs.append((sampler, int(steps)))
    return specs


def guidance_scales(text):
    try:
        scales = [float(g) for g in text.split(",")]
    except ValueError:
        raise UserError(f"--guidance: {text!r} is not comma-separated numbers") from None
    bad = [g for g in scales if not 0 <= g <= MAX_GUIDANCE]  # the range of generate.py's --guidance_scale
    if bad:
        raise UserError(f"--guidance {text}: each scale must be between 0 and {MAX_GUIDANCE:g}, got {bad[0]}")
    return scales


def guidance_schedules(text):
    names = text.split(",")
    for name in names:
        if name not in GUIDANCE_SCHEDULES:
            raise UserError(f"--guidance_schedules: {name!r} is not one of {', '.join(GUIDANCE_SCHEDULES)}")
    return names


def guidance_intervals(text):
    """'all,0.3:5' -> [(0, inf), (0.3, 5.0)]."""
    intervals = []
    for spec in text.split(","):
        if spec == "all":
            intervals.append((0.0, math.inf))
            continue
        lo, colon, hi = spec.partition(":")
        try:
            interval = (float(lo), float(hi)) if colon else None
        except ValueError:
            interval = None
        if interval is None or not 0 <= interval[0] < interval[1] < math.inf:  # as config.validate asks
            raise UserError(f"--guidance_intervals: {spec!r} is not LO:HI with 0 <= LO < HI and HI finite, or 'all'")
        intervals.append(interval)
    return intervals


def refuse_overwriting_other_files(out, figure):
    """--out may replace an earlier sweep's report and plot, nothing else: not the run's config.json,
    nor a training plot that shares the report's name."""
    earlier_sweep = False
    if os.path.exists(out):
        try:
            with open(out) as f:
                earlier_sweep = {"run", "num_samples", "rows"} <= set(json.load(f))
        except (OSError, ValueError, TypeError):
            pass
        if not earlier_sweep:
            raise UserError(f"--out {out} exists and is not a sampling sweep's report: name a new file")
    if os.path.exists(figure) and not earlier_sweep:
        raise UserError(f"--out {out}: its plot would replace {figure}, which no sweep wrote: name another file")


def main(argv=None):
    args = parse_args(argv)
    specs = sampler_specs(args.samplers)  # bad input fails here, before the run is loaded
    scales = guidance_scales(args.guidance)
    asked_schedules = guidance_schedules(args.guidance_schedules) if args.guidance_schedules else None
    asked_intervals = guidance_intervals(args.guidance_intervals) if args.guidance_intervals else None
    if args.num_samples < 2:  # before the run is loaded; check_sample_count then asks one per class
        raise UserError(f"--num_samples must be at least 2 (a Frechet distance needs two), got {args.num_samples}")
    device = select_device(args.device)
    # --seed through the run's config, whose validation checks its range as generate.py's
    pipe = load_pipeline(args.results_dir, device=device, use_ema=not args.no_ema,
                         overrides=argparse.Namespace(amp=args.amp, seed=args.seed))
    for scale in scales:
        refuse_untrained_guidance(pipe.cfg, scale)
    timesteps = pipe.cfg.timesteps
    too_long = [f"{sampler}:{steps}" for sampler, steps in specs if steps > timesteps]
    if too_long:
        raise UserError(f"--samplers {','.join(too_long)}: the run's schedule has {timesteps} steps, so a "
                        f"sampler takes 1..{timesteps}")
    out = writable_output(args.out or os.path.join(args.results_dir, "sampling_sweep.json"))
    if not out.endswith(".json"):  # its figure goes beside it, under the same name with .png
        raise UserError(f"--out {out}: name a .json file")
    refuse_overwriting_other_files(out, out[:-len(".json")] + ".png")
    check_sample_count(args.num_samples, pipe.num_classes, "the sweep")
    check_heldout_classes(pipe.cfg, pipe.class_names, pipe.heldout_digest)
    offline = OfflineMetrics(load_real_classifier(pipe.cfg, device, args.classifier_path), pipe.cfg, device,
                             pipe.num_classes)
    schedules = asked_schedules or [pipe.cfg.guidance_schedule]
    intervals = asked_intervals or [pipe.cfg.guidance_interval or (0.0, math.inf)]
    labels = balanced_labels(args.num_samples, pipe.num_classes)
    rows = []
    settings = [(sampler, steps, scale, schedule, interval) for sampler, steps in specs
                for scale in scales for schedule in schedules for interval in intervals]
    for sampler, steps, scale, schedule, interval in settings:
        t0 = time.time()
        images = to_uint8(pipe.sample_batched(labels, batch_size=args.batch_size, seed=args.seed,
                                              sampler=sampler, steps=steps, guidance_scale=scale,
                                              guidance_schedule=schedule, guidance_interval=interval))
        seconds = time.time() - t0
        metrics = offline(images, labels, memorization=False)
        rows.append({"sampler": sampler, "steps": steps, "guidance_scale": scale, "guidance_schedule": schedule,
                     "guidance_interval": [interval[0], interval[1] if interval[1] < math.inf else None],
                     "sampling_seconds": seconds, **metrics})
        print(f"{sampler:>6s} {steps:>4d} steps  guidance {scale:<4g} {schedule:<8s} "
              f"in ({interval[0]:g}, {interval[1]:g}]  "
              f"accuracy {metrics['sample_accuracy']:.3f} "
              f"(ratio {metrics['accuracy_ratio']:.3f}, per class "
              f"{', '.join(f'{a:.3f}' for a in metrics['sample_accuracy_per_class'])})  "
              f"FD {metrics['classifier_fd']:.3f}  KID {metrics['classifier_kid']:.4f}  {seconds:.0f} s", flush=True)
    report = {"run": os.path.basename(os.path.normpath(args.results_dir)), "num_samples": args.num_samples,
              "seed": args.seed, "weights": "raw" if args.no_ema else "ema", "amp": pipe.cfg.amp,
              "compute_dtype": str(amp_dtype(device, pipe.cfg.amp) or torch.float32),
              "device": device_name(device), "commit": commit_label(),
              "class_names": pipe.class_names, "rows": rows}
    write_json(report, out)
    figure = out[:-len(".json")] + ".png"
    sweep_figure(rows, figure, title=f"{report['run']}: {args.num_samples} samples, {report['weights']} weights")
    print(out)
    print(figure)


if __name__ == "__main__":
    sys.exit(run_main(main))
