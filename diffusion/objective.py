"""Prediction targets (eps / v / x0), their conversions, and the training loss."""
import torch


PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


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


class DiffusionLoss:
    """Sample t and noise, noise x0, and return the weighted per-sample MSE of the target."""

    def __init__(self, schedule, prediction="eps", weighting="uniform", min_snr_gamma=5.0):
        self.schedule, self.prediction = schedule, prediction
        self.weighting, self.gamma = weighting, min_snr_gamma

    def __call__(self, model, x0, y, t=None, noise=None):
        """t and noise are drawn unless given (validation fixes them so epochs compare)."""
        if t is None:
            t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = self.schedule.alpha_sigma(t, x0)
        output = model(alpha * x0 + sigma * noise, t, y)
        target = target_for(self.prediction, x0, noise, alpha, sigma)
        per_sample = (output.float() - target).pow(2).flatten(1).mean(1)
        weight = loss_weight(self.schedule.snr(t), self.prediction, self.weighting, self.gamma)
        return (weight.to(per_sample) * per_sample).mean()
