"""Discrete variance-preserving noise schedules: x_t = alpha_t x0 + sigma_t eps, with
alpha_t^2 = abar_t and sigma_t^2 = 1 - abar_t, for t = 0 .. T-1."""
import math

import torch


def linear_betas(timesteps, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_alphas_cumprod(timesteps, s=0.008):
    """Nichol & Dhariwal (2021): abar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2),
    evaluated at t = 1..T so that index 0 is already one step of noise."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f[1:] / f[0]


class NoiseSchedule:
    def __init__(self, kind="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02):
        if kind == "linear":
            betas = linear_betas(timesteps, beta_start, beta_end)
            alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        elif kind == "cosine":
            # Clip each step's beta at 0.999 as Nichol & Dhariwal do, so the last step stays finite.
            abar = cosine_alphas_cumprod(timesteps)
            betas = (1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])).clamp(max=0.999)
            alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        else:
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.timesteps = kind, timesteps
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod  # float64 [T]

    def abar(self, t):
        """abar at integer timesteps t (tensor); t = -1 means clean data (abar = 1)."""
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return table[(t + 1).long().cpu()]

    def alpha_sigma(self, t, like):
        """alpha_t, sigma_t shaped to broadcast against `like` [B, ...]."""
        abar = self.abar(t).to(device=like.device, dtype=torch.float32)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def q_sample(self, x0, t, noise):
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def snr(self, t):
        abar = self.abar(t)
        return abar / (1 - abar)

    def posterior_mean_variance(self, x0, x_t, t, s):
        """q(x_s | x_t, x0) for s < t (s = t - 1 is the usual DDPM posterior; s = -1 is the
        clean end): mean = c0 x0 + ct x_t, variance = (1 - abar_t/abar_s) (1 - abar_s)/(1 - abar_t)."""
        abar_t, abar_s = self.abar(t), self.abar(s)
        alpha_ts = abar_t / abar_s
        c0 = abar_s.sqrt() * (1 - alpha_ts) / (1 - abar_t)
        ct = alpha_ts.sqrt() * (1 - abar_s) / (1 - abar_t)
        var = (1 - alpha_ts) * (1 - abar_s) / (1 - abar_t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        f = lambda v: v.to(device=x0.device, dtype=torch.float32).view(shape)  # noqa: E731
        return f(c0) * x0 + f(ct) * x_t, f(var)


def sampling_timesteps(timesteps, steps):
    """`steps` timesteps from T-1 down to 0, evenly spaced; each sampler then takes one final
    step from t=0 to clean data."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in 1..{timesteps}, got {steps}")
    return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()
