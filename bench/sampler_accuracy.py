"""How close each sampler gets to the exact answer at each step count, on Gaussian data where that
answer is known in closed form (diffusion/gaussian.py): the deterministic samplers (DDIM,
DPM-Solver++) against the probability-flow ODE's endpoint of the same starting noise, DDPM by the
mean and standard deviation of what it samples. Errors are in units of the data's standard
deviation. A figure of the sampler and its timestep grid alone: the network is the ideal one.

    python bench/sampler_accuracy.py [--schedules linear,cosine,edm] [--steps 5,10,20,50,200] \
        [--out bench/results/NAME.json]
"""
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ArgumentParser, write_json  # noqa: E402
from diffusion.gaussian import exact_ode_endpoint, gaussian_denoiser  # noqa: E402
from diffusion.samplers import sample  # noqa: E402
from diffusion.schedule import SCHEDULES, NoiseSchedule  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from training.run import commit_label, writable_output  # noqa: E402

MU, STD = 0.5, 0.4  # the data: N(MU, STD^2), one value per sample


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedules", default="linear,cosine,edm")
    p.add_argument("--steps", default="5,10,20,50,200", help="comma-separated step counts")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--out", help="JSON file (default: printed only)")
    args = p.parse_args(argv)
    args.schedules = args.schedules.split(",")
    if any(s not in SCHEDULES for s in args.schedules):
        raise UserError(f"--schedules: choose from {', '.join(SCHEDULES)}, got {','.join(args.schedules)}")
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise UserError(f"--steps: {args.steps!r} is not comma-separated integers") from None
    if any(not 1 <= s <= args.timesteps for s in args.steps) or args.samples < 2:
        raise UserError(f"--steps must lie in 1..{args.timesteps} and --samples be at least 2")
    return args


def measure(schedule, steps, samples):
    """One row per sampler: errors in units of the data's standard deviation."""
    x_T = torch.randn(samples, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise, exact = gaussian_denoiser(schedule, MU, STD), exact_ode_endpoint(schedule, x_T, MU, STD)
    rows = {}
    for name in ("ddim", "dpmpp"):
        out = sample(name, denoise, x_T, schedule, steps)
        rows[name] = {"rms_error": ((out - exact).pow(2).mean().sqrt() / STD).item(),
                      "max_error": ((out - exact).abs().max() / STD).item()}
    out = sample("ddpm", denoise, x_T, schedule, steps, generator=torch.Generator().manual_seed(1))
    rows["ddpm"] = {"mean_error": ((out.mean() - MU) / STD).item(), "std_ratio": (out.std() / STD).item()}
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.out:
        writable_output(args.out)
    results = {kind: {steps: measure(NoiseSchedule(kind, args.timesteps), steps, args.samples) for steps in args.steps}
               for kind in args.schedules}
    print(f"{'schedule':<8s} {'steps':>5s}  {'ddim rms':>9s} {'dpmpp rms':>9s} {'dpmpp max':>9s}  "
          f"{'ddpm mean err':>13s} {'ddpm std ratio':>14s}")
    for kind, by_steps in results.items():
        for steps, r in by_steps.items():
            print(f"{kind:<8s} {steps:>5d}  {r['ddim']['rms_error']:>9.4f} {r['dpmpp']['rms_error']:>9.4f} "
                  f"{r['dpmpp']['max_error']:>9.4f}  {r['ddpm']['mean_error']:>13.4f} {r['ddpm']['std_ratio']:>14.4f}")
    if args.out:
        report = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "data": {"mean": MU, "std": STD},
                  "samples": args.samples, "timesteps": args.timesteps, "commit": commit_label(),
                  "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                  "results": {k: {str(s): r for s, r in v.items()} for k, v in results.items()}}
        write_json(report, args.out)
        print(args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
