"""Training batches straight from a uint8 image tensor kept on the device (no DataLoader workers)."""
from __future__ import annotations

from typing import Iterator

import torch

from data import to_float
from errors import UserError


class DeviceBatcher:
    """Keeps a uint8 image tensor on the device and yields augmented float batches.

    uint8 images are mapped to [-1, 1]; a floating-point tensor (e.g. VAE latents) is yielded as it is.

    Epoch e uses a permutation from a CPU generator seeded with (seed, e), so an epoch is reproducible
    and a resumed run restarts it exactly. With world_size > 1, rank r takes positions r, r + world_size,
    ... of that permutation: disjoint shards of equal length (the last n % world_size images of each
    epoch's permutation are skipped so every rank runs the same number of batches).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device, *, flip: bool = True,
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.images = images.to(device)  # uint8 images: a quarter of the memory of float32
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.batch_size, self.device, self.flip, self.drop_last = batch_size, device, flip, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = len(images) // world_size
        if len(self) == 0:  # e.g. a small --subset with a large batch size
            raise UserError(f"{len(images)} training images make no full batch of {batch_size} per process "
                            f"({world_size} process{'es' if world_size != 1 else ''}); use a smaller batch size or "
                            f"more images")

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32 in [-1, 1] [B, 3, H, W] (or the given float values), y int64 [B]), both on the device."""
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        order = torch.randperm(len(self.images), generator=generator)
        flips = torch.rand(len(self.images), generator=generator) < 0.5  # one coin per permutation position
        positions = torch.arange(self.rank, self.per_rank * self.world_size, self.world_size)
        order, flips = order[positions].to(self.device), flips[positions].to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            x = self.images[index]
            x = to_float(x) if x.dtype == torch.uint8 else x  # float tensors (latents) pass as they are
            if self.flip:
                x = torch.where(flips[start:start + self.batch_size, None, None, None], x.flip(3), x)
            yield x, self.labels[index]


def _mix(seed: int, epoch: int) -> int:
    """One 64-bit generator seed per (seed, epoch): seed in the high 32 bits (the config keeps
    --seed below 2**32, so no two seeds share an order), epoch in the low."""
    return ((seed & 0xFFFFFFFF) << 32) | (epoch & 0xFFFFFFFF)
