"""Samplers as pure functions over a denoiser `denoise(x, t) -> (x0_hat, eps_hat)` where t is
an integer timestep tensor [B]. Each walks `steps` timesteps down from T-1 and then one last
step to clean data, so `steps` is the number of network evaluations. `callback(i, t, x, x0)`
sees each step's input x_t and its clean estimate, before the step (as k-diffusion's does)."""
import math

import torch

from diffusion.schedule import sampling_timesteps

SAMPLERS = ("ddpm", "ddim", "dpmpp")


def _full(x, t):
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def ddim(denoise, x, schedule, steps, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021). eta=0 is deterministic; eta=1 is DDPM's ancestral sampler:
    its step is exactly the posterior q(x_s | x_t, x0_hat) (see the tests)."""
    ts = sampling_timesteps(schedule, steps).tolist()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x0, eps = denoise(x, _full(x, t))
        if callback is not None:
            callback(i, t, x, x0)
        abar_t, abar_s = schedule.abar(torch.tensor(t)).item(), schedule.abar(torch.tensor(s)).item()
        var = eta ** 2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
        x = abar_s ** 0.5 * x0 + max(1 - abar_s - var, 0.0) ** 0.5 * eps
        if var > 0:
            x = x + var ** 0.5 * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x


def ddpm(denoise, x, schedule, steps, generator=None, callback=None):
    """Ancestral sampling; with steps < T it is the respaced DDPM of Nichol & Dhariwal."""
    return ddim(denoise, x, schedule, steps, eta=1.0, generator=generator, callback=callback)


def dpmpp_2m(denoise, x, schedule, steps, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in the data prediction,
    with half-log-SNR lambda = log(alpha / sigma) as the time variable; first order on the
    first step and on the last step to clean data."""
    ts = sampling_timesteps(schedule, steps, spacing="logsnr").tolist()
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x0, _ = denoise(x, _full(x, t))
        if callback is not None:
            callback(i, t, x, x0)
        abar_t = schedule.abar(torch.tensor(t)).item()
        alpha_t, sigma_t = abar_t ** 0.5, (1 - abar_t) ** 0.5
        if s == -1:  # the last step lands on clean data: x = x0_hat
            x = x0
        else:
            abar_s = schedule.abar(torch.tensor(s)).item()
            alpha_s, sigma_s = abar_s ** 0.5, (1 - abar_s) ** 0.5
            h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
    return x


def sample(name, denoise, x, schedule, steps, generator=None, callback=None, eta=0.0):
    if name == "ddpm":
        return ddpm(denoise, x, schedule, steps, generator, callback)
    if name == "ddim":
        return ddim(denoise, x, schedule, steps, eta, generator, callback)
    if name == "dpmpp":
        return dpmpp_2m(denoise, x, schedule, steps, generator, callback)
    raise ValueError(f"unknown sampler {name!r}")
