"""The standard FID Inception network (pytorch-fid's port of the TF FID graph), FID/KID on
its 2048-d pool3 features, and cached reference statistics of the real data.

The weights (`pt_inception-2015-12-05-6726825d.pth`) cannot always be downloaded, so
they are looked up in order: an explicit path (--inception_weights), the torch hub cache,
then pytorch-fid's own download. Without them FID/KID are unavailable, but the offline
classifier-feature metrics still work.
"""

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytorch_fid.inception
import torch
import torchvision.models.inception
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from torch import nn

from errors import UserError, first_line, offline
from evaluation.metrics import feature_stats, frechet_distance_from_stats, kernel_inception_distance

FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[-1]  # pt_inception-2015-12-05-6726825d.pth
MAX_CACHED_FEATURES = 10_000


def hub_cache_weights_path() -> Path:
    """Where torch hub (and so pytorch-fid) keeps the downloaded FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _load_weights_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file (a text file gives a bare "KeyError: 101")
        state, why = None, f"torch.load failed: {type(exc).__name__}"
    else:
        why = f"it holds a {type(state).__name__}, not a state dict"
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a readable FID Inception weights file ({why}); expected {FID_WEIGHTS_FILE} "
                        f"from {FID_WEIGHTS_URL}")
    return state


def _resolve_fid_weights(weights_path: str | None) -> dict | None:
    """State dict of the FID Inception, or None when no source works."""
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise UserError(f"--inception_weights {weights_path}: no such file (expected {FID_WEIGHTS_FILE})")
        return _load_weights_file(Path(weights_path))
    if hub_cache_weights_path().is_file():
        return _load_weights_file(hub_cache_weights_path())
    if offline():
        return None
    try:
        return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", weights_only=True)
    except Exception as exc:  # offline, proxy, HTTP error, hash mismatch: all mean "no weights"
        warnings.warn(f"could not download the FID Inception weights: {first_line(exc)}")
        return None


@contextlib.contextmanager
def _fid_weights_source(state_dict: dict | None):
    """Make pytorch-fid's builder use `state_dict` instead of downloading; None keeps the random init."""
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        patch(mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state_dict))
        if state_dict is None:
            patch(mock.patch.object(torchvision.models.inception.Inception3, "load_state_dict", lambda *a, **k: None))
        yield


class FIDInceptionFeatures(nn.Module):
    """pytorch-fid's InceptionV3 (resize to 299, its own normalisation) taking our [-1, 1]
    images of any size and returning pool3 features [B, 2048]."""

    def __init__(self, state_dict: dict | None):
        super().__init__()
        with _fid_weights_source(state_dict):
            self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit_range = ((x + 1) / 2).clamp(0, 1)  # pytorch-fid expects [0, 1], like ToTensor of a PNG
        return self.net(unit_range)[0].flatten(1)


def _weights_digest(state_dict: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:12]


def load_fid_inception(weights_path: str | None, device, allow_random: bool = False) -> nn.Module:
    """The FID Inception feature network ([-1, 1] images -> [B, 2048]) in eval mode on `device`.

    allow_random=True (tests only) falls back to random weights with a warning."""
    state_dict = _resolve_fid_weights(weights_path)
    if state_dict is None:
        if not allow_random:
            raise UserError(
                f"FID Inception weights not found: put {FID_WEIGHTS_FILE} (from {FID_WEIGHTS_URL}) "
                f"at {hub_cache_weights_path()} or pass --inception_weights PATH "
                "(the classifier-feature metrics need no download)"
            )
        warnings.warn("FID Inception has RANDOM weights: its FID/KID values are meaningless")
    try:
        model = FIDInceptionFeatures(state_dict)
    except RuntimeError as exc:  # load_state_dict key/shape mismatch
        raise UserError(f"the FID Inception weights given are not {FID_WEIGHTS_FILE}: {first_line(exc)}") from exc
    model.weights_digest = "random" if state_dict is None else _weights_digest(state_dict)  # keys the real statistics' cache
    return model.to(device)


def fid_kid(real_feats, fake_feats, *, real_stats=None, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID and KID (mean, std) between real and generated features.

    real_stats=(mu, sigma) (e.g. from reference_stats over all real images) replaces the
    statistics of `real_feats` for FID; KID always uses `real_feats`."""
    mu_real, sigma_real = feature_stats(real_feats) if real_stats is None else real_stats
    kid_mean, kid_std = kernel_inception_distance(real_feats, fake_feats, kid_subsets, kid_subset_size)
    return {
        "fid": frechet_distance_from_stats(mu_real, sigma_real, *feature_stats(fake_feats)),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
    }


def reference_stats(
    key: str, cache_dir, compute_fn: Callable[[], torch.Tensor]
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(mu, sigma, feats) of the real training images for `key` (dataset, resolution, feature
    network), cached as <cache_dir>/<key>.npz; `compute_fn()` gives the features on a miss.

    mu/sigma use all features; at most MAX_CACHED_FEATURES (a fixed random subset) are kept for KID."""
    cache_dir = Path(cache_dir)
    path = cache_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", key) + ".npz")
    if not path.is_file():
        feats = compute_fn().detach().cpu().float().numpy()
        mu, sigma = feature_stats(feats)
        keep = np.random.default_rng(0).permutation(len(feats))[:MAX_CACHED_FEATURES]
        feats = feats[np.sort(keep)]
        try:
            _write_cache(path, mu=mu, sigma=sigma, feats=feats)
        except OSError as exc:  # a read-only or full place: the statistics serve this run uncached
            print(f"note: reference statistics not cached: cannot write to {cache_dir} ({exc.strerror or exc})",
                  file=sys.stderr)
            return mu, sigma, torch.from_numpy(feats)
    with np.load(path) as cached:
        return cached["mu"], cached["sigma"], torch.from_numpy(cached["feats"])


def _write_cache(path: Path, **arrays):
    """Write then rename, so an interrupted run never leaves a truncated cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
