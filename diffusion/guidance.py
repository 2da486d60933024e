"""Classifier-free guidance (Ho & Salimans 2022) and guidance-scale schedules.

Convention: scale w mixes out = uncond + w (cond - uncond); w = 1 is the plain conditional
model (the unconditional branch is then not even evaluated), w = 0 the unconditional one."""
import math

import torch

from diffusion.objective import to_x0_eps

GUIDANCE_SCHEDULES = ("constant", "linear", "adaptive")


def guidance_scale_at(scale, schedule, progress):
    """The scale at `progress` in [0, 1] (0 = first, noisiest step). 'adaptive' is S2's:
    half the extra guidance early, the full amount in the middle, 1.5x late; 'linear' ramps
    the extra guidance from 0 to 2x (its mean over a run is the constant scale, adaptive's
    nearly). Schedules shape guidance above 1 only: a scale at or below 1 stays constant, since
    ramping 0 (unconditional) would pass through the conditional model to anti-guidance."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}")
    extra = scale - 1.0
    if schedule == "constant" or extra <= 0:
        return scale
    if schedule == "linear":
        return 1.0 + extra * 2.0 * progress
    return 1.0 + extra * (0.5 if progress < 1 / 3 else 1.0 if progress < 2 / 3 else 1.5)  # adaptive


def in_guidance_interval(schedule, t, interval):
    """Whether the noise level of timestep t (the first of the batch; samplers pass one) lies in
    interval = (lo, hi], measured as noise over signal sigma_t / alpha_t (EDM's sigma). None:
    every level. Kynkaanniemi et al. (2024) found guidance at high noise collapses the variety of
    the samples and at low noise does next to nothing, so guiding only in between does better."""
    if interval is None:
        return True
    abar = schedule.abar(t[:1]).item()
    noise_over_signal = math.sqrt((1 - abar) / abar)
    return interval[0] < noise_over_signal <= interval[1]


def make_denoiser(model, schedule, prediction, labels, null_label, guidance_scale=1.0,
                  guidance_schedule="constant", clip_x0=None, steps=None, guidance_interval=None):
    """Wrap a network model(x, t, y) into denoise(x, t) -> (x0_hat, eps_hat) with guidance.
    `steps` (the sampler's step count) lets the scale schedule know how far along a call is;
    outside `guidance_interval` (see in_guidance_interval) the scale is 1."""
    if steps is None and guidance_schedule != "constant" and guidance_scale > 1:
        raise ValueError(f"a {guidance_schedule!r} guidance schedule needs the sampler's step count")
    calls = {"n": 0}

    def denoise(x, t):
        # a single step sits in the middle of its ramp, so it is guided at the scale asked for
        progress = 0.5 if steps in (None, 1) else min(calls["n"] / (steps - 1), 1.0)
        calls["n"] += 1
        w = guidance_scale_at(guidance_scale, guidance_schedule, progress)
        if not in_guidance_interval(schedule, t, guidance_interval):
            w = 1.0
        if w == 1.0:
            output = model(x, t, labels).float()
        else:
            null = torch.full_like(labels, null_label)
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
            cond, uncond = both.chunk(2)
            output = uncond + w * (cond - uncond)
        alpha, sigma = schedule.alpha_sigma(t, x)
        x0, eps = to_x0_eps(output, x, alpha, sigma, prediction)
        if clip_x0 is not None:  # pixel models: keep x0_hat in the data range, re-derive eps
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - alpha * x0) / sigma
        return x0, eps

    return denoise
