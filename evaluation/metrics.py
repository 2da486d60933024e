"""Sample-quality metrics on feature vectors, and feature extraction.

Features may be torch tensors or numpy arrays of shape [N, D]; statistics are
computed in float64 because covariance products of 2048-d features lose too
much precision in float32.
"""

import warnings
from typing import Callable

import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance


def _float64_numpy(feats) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"expected features of shape [N, D], got {feats.shape}")
    return feats


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    feats = _float64_numpy(feats)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Fréchet distance between Gaussians, via pytorch-fid's maintained implementation."""
    with warnings.catch_warnings():
        # pytorch-fid 0.3.0 passes scipy's deprecated `disp` flag; the result is unaffected.
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated.*", category=DeprecationWarning)
        return float(calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception pool3)."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def _unbiased_polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 between equal-size samples x, y [m, d]."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    # Dropping the diagonals (k(x_i, x_i) terms) is what makes the estimate unbiased.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(
    feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel, averaged
    over random subsets. Returns (mean, std over subsets); about 0 (can be < 0) for equal distributions."""
    a, b = _float64_numpy(feats_a), _float64_numpy(feats_b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    estimates = [
        _unbiased_polynomial_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))


def per_class_accuracy(logits_or_preds, labels, num_classes: int) -> dict:
    """Overall accuracy, accuracy per class (nan for a class with no labelled examples) and their
    mean over the classes that have examples (balanced accuracy: what compares across splits
    whose class frequencies differ).

    `logits_or_preds` is either logits [N, C] or predicted labels [N]."""
    preds = torch.as_tensor(logits_or_preds)
    if preds.ndim == 2:
        preds = preds.argmax(dim=1)
    labels = torch.as_tensor(labels).to(preds.device)
    correct = (preds == labels).double()
    class_counts = torch.bincount(labels, minlength=num_classes).double()
    class_correct = torch.bincount(labels, weights=correct, minlength=num_classes)
    per_class = class_correct / class_counts  # 0/0 gives nan for empty classes
    return {
        "accuracy": correct.mean().item(),
        "balanced_accuracy": per_class.nanmean().item(),
        "per_class": per_class.tolist(),
        "class_counts": class_counts.long().tolist(),
    }


def uint8_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float input is passed through as float32."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256, device="cpu",
    mirrored: bool = False,
) -> torch.Tensor:
    """Run `fn` (images in [-1, 1] -> features) over `images` (uint8 [N,3,H,W] or float in [-1, 1])
    in batches, or over their mirror images (flipped a batch at a time, not as a copy of them all);
    returns float32 features on the CPU."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = uint8_to_unit_range(images[start : start + batch_size].to(device))
            outputs.append(fn(batch.flip(-1) if mirrored else batch).float().cpu())
    return torch.cat(outputs)
