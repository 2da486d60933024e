"""Data x0 ~ N(mu, s^2 I), for which the ideal denoiser and the probability-flow ODE's answer are
known in closed form: the yardstick of the samplers (tests/test_diffusion.py and
bench/sampler_accuracy.py)."""
import math

import torch


def gaussian_denoiser(schedule, mu, s):
    """The exact E[x0 | x_t] (and the matching eps) of N(mu, s^2) data, as a sampler's denoiser."""
    def denoise(x, t):
        alpha, sigma = schedule.alpha_sigma(t, x)
        x0 = mu + alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2) * (x - alpha * mu)
        return x0, (x - alpha * x0) / sigma
    return denoise


def exact_ode_endpoint(schedule, x_T, mu, s):
    """Where the probability-flow ODE takes x_T at t = T-1: it keeps
    (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed."""
    a = schedule.abar(torch.tensor(schedule.timesteps - 1)).item()
    return mu + s * (x_T - math.sqrt(a) * mu) / math.sqrt(a * s ** 2 + 1 - a)
