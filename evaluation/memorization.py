"""Does the model copy its training images? Nearest-training-neighbour distances of generated
samples, compared with those of held-out real images (which the model never saw)."""

from pathlib import Path

import torch
import torch.nn.functional as F

HELDOUT_FLAG_QUANTILE = 0.01  # default threshold flags ~1% of held-out real images by construction


def nearest_neighbours(query_feats, train_feats, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row: cosine distance (1 - cos) to its nearest training row, and that row's index."""
    train = F.normalize(torch.as_tensor(train_feats).float(), dim=1)
    distances, indices = [], []
    for chunk in torch.as_tensor(query_feats).float().split(batch):  # chunked so [batch, N_train] fits in memory
        best_similarity, best_index = (F.normalize(chunk, dim=1) @ train.T).max(dim=1)
        distances.append(1 - best_similarity)
        indices.append(best_index)
    # Exact copies can come out at -1e-7 from rounding.
    return torch.cat(distances).clamp_min(0), torch.cat(indices)


def memorization_report(
    gen_feats, heldout_feats, train_feats, threshold: float | None = None, *, num_closest: int = 64
) -> dict:
    """Near-copy statistics of generated samples (JSON-serialisable).

    A generated sample is a near copy when its nearest-training distance is <= threshold;
    the default threshold is the 1st percentile of held-out real images' nearest-training
    distances, so `heldout_flagged_fraction` (~0.01) is the rate to compare
    `near_copy_fraction` against. The `num_closest` closest (generated, training) pairs are listed."""
    gen_distance, gen_nearest = nearest_neighbours(gen_feats, train_feats)
    heldout_distance, _ = nearest_neighbours(heldout_feats, train_feats)
    if threshold is None:
        threshold = torch.quantile(heldout_distance.double(), HELDOUT_FLAG_QUANTILE).item()
    closest = gen_distance.argsort()[:num_closest]
    return {
        "threshold": threshold,
        "near_copy_fraction": (gen_distance <= threshold).double().mean().item(),
        "heldout_flagged_fraction": (heldout_distance <= threshold).double().mean().item(),
        "gen_median_distance": gen_distance.median().item(),
        "heldout_median_distance": heldout_distance.median().item(),
        "closest_gen_indices": closest.tolist(),
        "closest_train_indices": gen_nearest[closest].tolist(),
        "closest_distances": gen_distance[closest].tolist(),
    }


def save_closest_pairs(path, gen_images_uint8: torch.Tensor, train_image, report: dict, k: int = 16) -> None:
    """One PNG, a row per pair: generated sample (left) | its nearest training image (right), each
    row named by its distance and whether that is a near copy (<= the report's threshold).
    train_image(i) is the training image of the report's training index i."""
    from viz.figures import labelled_rows
    gen = gen_images_uint8[report["closest_gen_indices"][:k]].cpu()
    train = torch.stack([train_image(i) for i in report["closest_train_indices"][:k]]).cpu()
    threshold = report["threshold"]
    names = [f"distance {d:.4f}\n" + ("near copy" if d <= threshold else "not a near copy")
             for d in report["closest_distances"][:k]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labelled_rows([torch.stack(pair) for pair in zip(gen, train)], names, str(path),
                  col_names=["generated\nsample", "nearest\ntraining image"],
                  title=f"closest pairs (cosine distance of classifier features;\nnear copy: <= {threshold:.4f})")
