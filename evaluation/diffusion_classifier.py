"""Zero-shot classification with a class-conditional denoiser (Li et al. 2023, "Your diffusion
model is secretly a zero-shot classifier"): the class whose conditioning best predicts the
noise added to an image is the predicted class."""

from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t [B], y [B]) -> eps


def default_timesteps(num_train_timesteps: int, num_levels: int = 10) -> torch.Tensor:
    """Evenly spaced over the middle of [0, T): at very low t every class predicts the noise
    almost perfectly and at very high t the image is nearly gone, so neither separates classes."""
    return torch.linspace(0.1, 0.9, num_levels).mul(num_train_timesteps - 1).round().long()


@torch.no_grad()
def diffusion_classify(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    num_classes: int,
    alphas_cumprod: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    num_noises: int = 2,
    batch_size: int = 256,
    seed: int = 0,
    return_errors: bool = False,
):
    """Predicted labels [N] = argmin over classes c of the mean over fixed (t, noise) pairs of
    mean((eps_fn(sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t, c) - noise)^2).

    x0: [N, ...] in the model's space. alphas_cumprod: [T]. timesteps defaults to 10 levels of
    `default_timesteps`, each with `num_noises` noises. batch_size counts (image, class) inputs
    per eps_fn call. With return_errors=True also returns the errors [N, num_classes]."""
    device = x0.device
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)
    if timesteps is None:
        timesteps = default_timesteps(len(abar))
    pair_timesteps = torch.as_tensor(timesteps, dtype=torch.long).repeat_interleave(num_noises).tolist()
    # One fixed set of (t, noise) pairs shared by every image and class, so the errors of two
    # classes differ only through the class and not through the luck of the noise draw.
    generator = torch.Generator().manual_seed(seed)
    pair_noises = torch.randn((len(pair_timesteps), *x0.shape[1:]), generator=generator).to(device)

    images_per_call = max(1, batch_size // num_classes)
    classes = torch.arange(num_classes, device=device)
    errors = torch.zeros(len(x0), num_classes, device=device)
    for start in range(0, len(x0), images_per_call):
        images = x0[start : start + images_per_call].float()
        num_images = len(images)
        # Image-major layout: [image0 class0, image0 class1, ..., image1 class0, ...].
        images_per_class = images.repeat_interleave(num_classes, dim=0)
        labels = classes.repeat(num_images)
        for t, noise in zip(pair_timesteps, pair_noises):
            x_t = abar[t].sqrt() * images_per_class + (1 - abar[t]).sqrt() * noise
            t_batch = torch.full((len(labels),), t, dtype=torch.long, device=device)
            squared_error = (eps_fn(x_t, t_batch, labels).float() - noise).pow(2).flatten(1).mean(dim=1)
            errors[start : start + num_images] += squared_error.view(num_images, num_classes)
    errors /= len(pair_timesteps)
    predictions = errors.argmin(dim=1)
    return (predictions, errors) if return_errors else predictions
