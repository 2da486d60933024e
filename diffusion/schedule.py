"""Discrete variance-preserving noise schedules: x_t = alpha_t x0 + sigma_t eps, with
alpha_t^2 = abar_t and sigma_t^2 = 1 - abar_t, for t = 0 .. T-1."""
import math

import torch


def linear_betas(timesteps, beta_start=1e-4, beta_end=0.02):
    """DDPM's betas, given for 1000 steps and scaled by 1000/T (as improved DDPM does) so that
    every T spans the same noise levels: unscaled, T = 100 would end at abar 0.36, far from the
    pure noise every sampler starts from. Capped at 0.999 like the cosine schedule's."""
    scale = 1000 / timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64).clamp(max=0.999)


def betas_of(alphas_cumprod):
    """beta_t = 1 - abar_t / abar_{t-1}, with abar_{-1} = 1."""
    return 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])


def cosine_alphas_cumprod(timesteps, s=0.008):
    """Nichol & Dhariwal (2021): abar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2),
    evaluated at t = 1..T so that index 0 is already one step of noise."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f[1:] / f[0]


# EDM (Karras et al. 2022) trains on ln(sigma) ~ N(-1.2, 1.2^2) for sigma in [0.002, 80] with data
# of standard deviation 0.5; here in units of the data's standard deviation (standardized latents
# have 1; [-1, 1] pixels about 0.5, so they see up to twice that noise).
EDM_P_MEAN, EDM_P_STD = -1.2 - math.log(0.5), 1.2
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002 / 0.5, 80.0 / 0.5


def edm_sigmas(timesteps):
    """sigma_t (noise over signal: x_t / alpha_t = x0 + sigma_t eps) at `timesteps` evenly spaced
    quantiles of EDM's log-normal law cut to [sigma_min, sigma_max], the ends included: drawing t
    uniformly then draws EDM's training noise levels, and t = T-1 is its sampler's sigma_max."""
    z = lambda sigma: (math.log(sigma) - EDM_P_MEAN) / EDM_P_STD  # noqa: E731
    lo, hi = (torch.special.ndtr(torch.tensor(z(s), dtype=torch.float64)) for s in (EDM_SIGMA_MIN, EDM_SIGMA_MAX))
    u = torch.linspace(0, 1, timesteps, dtype=torch.float64) * (hi - lo) + lo
    sigma = torch.exp(EDM_P_MEAN + EDM_P_STD * torch.special.ndtri(u))
    sigma[0], sigma[-1] = EDM_SIGMA_MIN, EDM_SIGMA_MAX  # exact ends, whatever ndtri's rounding
    return sigma


SCHEDULES = ("linear", "cosine", "edm")


class NoiseSchedule:
    def __init__(self, kind="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02):
        if kind == "linear":
            betas = linear_betas(timesteps, beta_start, beta_end)
            alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        elif kind == "cosine":
            # Clip each step's beta at 0.999 as Nichol & Dhariwal do, so the last step stays finite.
            abar = cosine_alphas_cumprod(timesteps)
            betas = betas_of(abar).clamp(max=0.999)
            alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        elif kind == "edm":  # variance preserving: alpha^2 = 1 / (1 + sigma^2)
            alphas_cumprod = 1 / (1 + edm_sigmas(timesteps) ** 2)
            betas = betas_of(alphas_cumprod)
        else:
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.timesteps = kind, timesteps
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod  # float64 [T]
        self._tables = {}  # abar with the clean end first, one copy per device

    def abar(self, t):
        """abar at integer timesteps t (tensor), on t's device; t = -1 means clean data (abar = 1).
        Looked up there, so a training step on a GPU never waits for a copy to the host."""
        table = self._tables.get(t.device)
        if table is None:
            table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
            table = self._tables[t.device] = table.to(t.device, torch.float32 if t.device.type == "mps" else None)
        return table[(t + 1).long()]

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


LOGSNR_FLOOR = -5.5


def sampling_timesteps(schedule, steps, spacing="time"):
    """`steps` distinct integer timesteps from T-1 down to 0; each sampler then takes one final
    step to clean data. spacing "time" is uniform in t (DDPM/DDIM); "logsnr" is uniform in
    lambda = log(alpha/sigma), which DPM-Solver needs: uniform t wastes its few steps where lambda
    barely moves (20 steps on Gaussian data: max error 0.35 -> 0.02). The last call, at t = 0,
    changes little: a grid stopping one step above it brings DPM-Solver++ up to 43% closer to
    the exact answer with the ideal denoiser, but raised FD on a real model under the default
    ramped guidance, whose largest scale then lands where it still acts (BENCHMARKS.md)."""
    T = schedule.timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if spacing == "time":
        targets = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
    elif spacing == "logsnr":
        lam = 0.5 * torch.log(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))  # decreasing in t
        # Below lambda = -5.5 (sigma/alpha > 240) the signal is negligible; the cosine schedule's
        # clipped last betas plunge to -10 there, and would eat steps for nothing.
        wanted = torch.linspace(max(float(lam[-1]), LOGSNR_FLOOR), float(lam[0]), steps, dtype=torch.float64)
        index = torch.searchsorted(-lam, -wanted).clamp(1, T - 1)  # interpolate t(lambda) linearly
        lo, hi = lam[index - 1], lam[index]
        targets = (index - 1) + (lo - wanted) / (lo - hi)
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    ts = []
    for i, target in enumerate(targets.tolist()):  # round, keeping them distinct and in range
        t = max(int(round(target)), steps - 1 - i)
        ts.append(min(t, ts[-1] - 1) if ts else T - 1)  # always start from pure noise at T-1
    return torch.tensor(ts)
