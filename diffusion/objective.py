"""Prediction targets (eps / v / x0), their conversions, and the training loss."""
import functools

import torch


PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
LOSS_TERMS = ("mse", "balanced")
TIMESTEP_SAMPLINGS = ("uniform", "adaptive")


def to_x0_eps(output, x_t, alpha, sigma, prediction):
    """Network output -> (x0_hat, eps_hat) for x_t = alpha x0 + sigma eps."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "v":  # v = alpha eps - sigma x0
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    raise ValueError(f"unknown prediction {prediction!r}")


def target_for(prediction, x0, noise, alpha, sigma):
    return {"eps": noise, "v": alpha * noise - sigma * x0, "x0": x0}[prediction]


def loss_weight(snr, prediction, weighting, gamma=5.0):
    """Per-sample weight on the target's MSE. min-SNR-gamma (Hang et al. 2023) equals
    min(snr, gamma) on the x0 error, expressed for each target."""
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        clipped = snr.clamp(max=gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
    raise ValueError(f"unknown loss weighting {weighting!r}")


_KERNELS = {"laplacian": [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
            "sobel_x": [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
            "sobel_y": [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]}


@functools.cache
def _kernel(name, device):
    """Made once per device: a copy from host memory every step would wait for the GPU."""
    return torch.tensor(_KERNELS[name], device=device).view(1, 1, 3, 3)


def _filter(x, name):
    """The same 3x3 kernel on every channel, in float32 even under autocast: differences of
    neighbouring pixels near clean data are below bf16's resolution."""
    c = x.shape[1]
    weight = _kernel(name, x.device).expand(c, 1, 3, 3)
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.conv2d(x.float(), weight, padding=1, groups=c)


def balanced_terms(output, target, x0_hat, x0, abar):
    """S2's "balanced adaptive loss", per sample: MSE + L1 + (1 - cosine) of the target, plus
    Laplacian (high-frequency) and Sobel (edge) errors of the clean-image estimate. The detail
    terms are weighted by each sample's own signal fraction abar_t: at high noise the details
    cannot be known and only the MSE speaks; near clean data the details count fully."""
    flat_out, flat_target = output.flatten(1), target.flatten(1)
    mse = (flat_out - flat_target).pow(2).mean(1)
    l1 = (flat_out - flat_target).abs().mean(1)
    cosine = 1 - torch.nn.functional.cosine_similarity(flat_out, flat_target, dim=1)
    lap = (_filter(x0_hat, "laplacian") - _filter(x0, "laplacian")).pow(2).flatten(1).mean(1)
    edges = lambda x: (_filter(x, "sobel_x").pow(2) + _filter(x, "sobel_y").pow(2) + 1e-6).sqrt()  # noqa: E731
    sobel = (edges(x0_hat) - edges(x0)).pow(2).flatten(1).mean(1)
    return mse + 0.5 * l1 + 0.1 * cosine + abar * (0.1 * lap + 0.1 * sobel)


class AdaptiveTimesteps:
    """Importance sampling of timesteps (Nichol & Dhariwal 2021): draw t with probability
    proportional to the root mean square loss of its bin (kept as a running average on the
    device, no host sync), mixed with 10% uniform; each sample is reweighted by 1 / (T p(t)) so
    the objective stays the same in expectation."""

    def __init__(self, timesteps, bins=20, decay=0.99, uniform=0.1, sum_across_ranks=None):
        bins = min(bins, timesteps)  # no empty bin
        self.timesteps, self.bins, self.decay, self.uniform = timesteps, bins, decay, uniform
        # under DDP: every rank's losses update one table (as ADM's loss-aware sampler gathers them)
        self.sum_across_ranks = sum_across_ranks or (lambda x: x)
        # integer bin edges, so that sample() and update() put every timestep in the same bin
        self.edges = torch.arange(bins + 1) * timesteps // bins
        self.mean_sq = None

    def probabilities(self, device):
        if self.mean_sq is None:  # both on the training device from the first step: no copies per step
            self.mean_sq = torch.ones(self.bins, device=device)
            self.edges = self.edges.to(device)
        p = self.mean_sq.sqrt()
        return (1 - self.uniform) * p / p.sum() + self.uniform / self.bins

    def sample(self, n, device):
        p = self.probabilities(device)
        b = torch.multinomial(p, n, replacement=True)
        width = self.edges[b + 1] - self.edges[b]
        t = self.edges[b] + (torch.rand(n, device=device) * width).long().clamp(max=width - 1)
        return t, width / (self.timesteps * p[b])  # p(t) = p(bin) / width: the weight is 1 / (T p(t))

    def update(self, t, losses):
        self.probabilities(t.device)  # initialises the running means
        b = torch.bucketize(t, self.edges[1:], right=True)
        sums_counts = torch.zeros(2, self.bins, device=t.device)
        sums_counts[0].index_add_(0, b, losses.detach().float().pow(2))
        sums_counts[1].index_add_(0, b, torch.ones_like(losses, dtype=torch.float))
        sums, counts = self.sum_across_ranks(sums_counts)
        seen = counts > 0
        batch_mean = torch.where(seen, sums / counts.clamp_min(1), self.mean_sq)
        self.mean_sq = torch.where(seen, self.decay * self.mean_sq + (1 - self.decay) * batch_mean, self.mean_sq)

    def state_dict(self):
        return {"mean_sq": self.mean_sq}

    def load_state_dict(self, state):
        self.mean_sq = state["mean_sq"]
        self.edges = self.edges.to(self.mean_sq.device)


class DiffusionLoss:
    """Sample t and noise, noise x0, and return the weighted per-sample error of the target:
    plain MSE, or S2's balanced terms; t uniform or adaptively importance-sampled."""

    def __init__(self, schedule, prediction="eps", weighting="uniform", min_snr_gamma=5.0, terms="mse",
                 timestep_sampling="uniform", sum_across_ranks=None):
        self.schedule, self.prediction = schedule, prediction
        self.weighting, self.gamma, self.terms = weighting, min_snr_gamma, terms
        self.adaptive = (AdaptiveTimesteps(schedule.timesteps, sum_across_ranks=sum_across_ranks)
                         if timestep_sampling == "adaptive" else None)

    def __call__(self, model, x0, y, t=None, noise=None):
        """t and noise are drawn unless given (validation fixes them so epochs compare)."""
        importance = None
        if t is None and self.adaptive is not None:
            t, importance = self.adaptive.sample(x0.shape[0], x0.device)
        elif t is None:
            t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = self.schedule.alpha_sigma(t, x0)
        x_t = alpha * x0 + sigma * noise
        output = model(x_t, t, y).float()
        target = target_for(self.prediction, x0, noise, alpha, sigma)
        if self.terms == "balanced":
            x0_hat, _ = to_x0_eps(output, x_t, alpha, sigma, self.prediction)
            per_sample = balanced_terms(output, target, x0_hat, x0, alpha.flatten() ** 2)
        else:
            per_sample = (output - target).pow(2).flatten(1).mean(1)
        weighted = loss_weight(self.schedule.snr(t), self.prediction, self.weighting, self.gamma).to(per_sample) \
            * per_sample
        if importance is not None:
            self.adaptive.update(t, weighted)
            weighted = weighted * importance
        return weighted.mean()
