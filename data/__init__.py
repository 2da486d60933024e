"""Datasets as in-memory uint8 tensors: one registry, one split rule, one resize helper.

Every source (CIFAR pickles, an image folder, CelebA, Flowers102) is read into its *official*
splits (`Source`); `load_dataset` then applies the same rule everywhere to get train/val/test,
decodes only what is asked for, and caches the result for the life of the process.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
import re

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from errors import UserError, offline

SPLITS = ("train", "val", "test")
PROGRESS_THRESHOLD = 2000  # show a progress bar when decoding more images than this


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W], square, at the requested image_size
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]  # index = label

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawSplit:
    """One official split before decoding: image files (or CIFAR's in-memory uint8 [N, H, W, 3] pixels)."""

    images: Sequence[str | Path] | np.ndarray
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    """A dataset's official splits; a missing or empty val/test means the source has none."""

    class_names: list[str]
    train: RawSplit
    val: RawSplit | None = None
    test: RawSplit | None = None


@dataclass(frozen=True)
class DatasetSpec:
    loader: Callable[..., Source]  # loader(root: Path, download: bool, **{o: value for o in options})
    default_image_size: int
    description: str
    options: tuple[str, ...] = ()  # which load_dataset keywords the loader takes


# ---------------------------------------------------------------------------------------------
# Pixels


def square_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centered square crop (side = shorter edge), then an antialiased resize to size x size.

    Cropping by proportion before resizing means a half-resolution copy of a picture gives the same
    result; for portrait CelebA faces this is exactly "side = width, top = (height - width) // 2".
    """
    if image.mode.startswith("I"):  # 16-bit greyscale (I;16, or I for 16-bit PNGs): scale, as convert() clips
        levels = np.asarray(image.convert("I"), dtype=np.float64) / 257.0
        image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8))
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))  # not resize(box=...): its filter reads past the box
    return square.resize((size, size), Image.Resampling.BICUBIC)


def _decode_one(item: str | Path | np.ndarray, size: int) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return np.asarray(square_crop_resize(Image.fromarray(item), size))
    try:
        with Image.open(item) as image:
            return np.asarray(square_crop_resize(image, size))
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise UserError(f"cannot read image {item}: {error}") from error


def _decode(raw: RawSplit, size: int, class_names: list[str], what: str) -> ImageSet:
    labels = torch.tensor(raw.labels, dtype=torch.int64)
    items = raw.images
    if isinstance(items, np.ndarray) and items.shape[1:] == (size, size, 3):
        pixels = items  # already square at the right size (CIFAR at 32): no PIL round trip
    else:
        pixels = np.empty((len(items), size, size, 3), dtype=np.uint8)
        # PIL releases the GIL while decoding and resizing, so threads scale.
        with ThreadPoolExecutor() as pool:
            decoded = pool.map(lambda item: _decode_one(item, size), items)
            bar = tqdm(decoded, total=len(items), desc=f"decoding {what}", disable=len(items) <= PROGRESS_THRESHOLD)
            for i, array in enumerate(bar):
                pixels[i] = array
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, labels, list(class_names))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


@contextmanager
def reading(path: str | Path, advice: str, *errors: type[BaseException]):
    """Parse a dataset's metadata file inside this block: a malformed one (a truncated download, an
    HTML error page saved under the file's name) becomes one clear error, not a traceback."""
    try:
        yield
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, *errors) as error:  # UnicodeDecodeError too
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise UserError(f"cannot read {path} ({detail}); {advice}") from error


def check_download_allowed(what: str, by_hand: str) -> None:
    """--download under SUITE_OFFLINE=1 stops here: on a firewalled machine a download can hang."""
    if offline():
        raise UserError(f"SUITE_OFFLINE=1 forbids downloading {what}; unset it, or {by_hand}")


def safe_name(class_name: str) -> str:
    """File-safe class name: "bishop of llandaff" -> "bishop_of_llandaff", "colt's foot" -> "colt_s_foot"."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", class_name).strip("_.") or "class"


# ---------------------------------------------------------------------------------------------
# Splits


def _split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified carve-out: from each class, round(val_fraction * n) images go to val (at least one,
    leaving at least one for train). Both index lists follow one seeded permutation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    if val_fraction > 0:
        for label in labels.unique():
            members = order[labels[order] == label]
            count = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
            in_val[members[:count]] = True
    return order[~in_val[order]], order[in_val[order]]


def _stratified_sample(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` indices drawn at random with each class's share as in `labels` (to within about one image):
    every class is dealt out evenly along one seeded permutation, and the sample is its prefix."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    position = torch.empty(len(labels))
    for label in labels.unique():
        members = order[labels[order] == label]
        position[members] = (torch.arange(len(members)) + 0.5) / len(members)
    return order[torch.sort(position[order], stable=True).indices[:count]]


def _take(images: ImageSet, indices: torch.Tensor) -> ImageSet:
    return ImageSet(images.images[indices], images.labels[indices], images.class_names)


_SOURCES: dict[tuple, Source] = {}
_DECODED: dict[tuple, ImageSet] = {}


def clear_cache() -> None:
    """Forget every loaded dataset (they stay cached for the process otherwise)."""
    _SOURCES.clear()
    _DECODED.clear()


def split_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A fingerprint of a split's labelled images, whatever their order: two runs hold out the
    same images exactly when their held-out splits have the same digest."""
    items = sorted(hashlib.sha256(image.contiguous().numpy().tobytes() + int(label).to_bytes(8, "little")).digest()
                   for image, label in zip(images, labels))
    return hashlib.sha256(b"".join(items)).hexdigest()[:16]


def load_dataset(name: str, root: str | Path | None, split: str, image_size: int | None = None, *,
                 subset: int | None = None, download: bool = False, val_fraction: float = 0.1,
                 split_seed: int = 0, attribute: str = "Smiling", flowers_splits: str = "all") -> ImageSet:
    """One split of a dataset as uint8 tensors. The returned tensors are shared with the cache: do not
    modify them in place.

    val: the official validation split when the source has a non-empty one, else a stratified
    `val_fraction` of the official train split (seeded by `split_seed`); train: the rest.
    test: the official test split, else the same images as val. val_fraction=0 (and no official val):
    train = all official train images, val = test.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if subset is not None and subset < 1:
        raise UserError(f"subset must be a positive number of images, got {subset}")
    image_size = image_size or spec.default_image_size
    root = Path(root if root is not None else Path("datasets") / name).expanduser()

    options = {"attribute": attribute, "flowers_splits": flowers_splits}
    options = {key: options[key] for key in spec.options}
    source_key = (name, str(root.resolve()), *sorted(options.items()))
    if source_key not in _SOURCES:
        _SOURCES[source_key] = spec.loader(root, download=download, **options)
    source = _SOURCES[source_key]

    def decoded(which: str) -> ImageSet:
        key = (*source_key, image_size, which)
        if key not in _DECODED:
            _DECODED[key] = _decode(getattr(source, which), image_size, source.class_names, f"{name} {which}")
        return _DECODED[key]

    has_val = source.val is not None and len(source.val) > 0
    has_test = source.test is not None and len(source.test) > 0
    if not has_val and val_fraction == 0 and not has_test:
        raise UserError(f"{name} at {root} has no official validation or test split, so val_fraction=0 "
                        f"leaves nothing held out; use a val_fraction above 0")

    official = None  # the official split that serves a held-out request, if any
    if split == "test" and has_test:
        official = "test"
    elif split != "train" and (has_val or val_fraction == 0):
        official = "val" if has_val else "test"
    if official:
        # In one seeded random order: official files often come class by class, and callers that
        # take a held-out split's first images must get every class.
        result = decoded(official)
        result = _take(result, torch.randperm(len(result), generator=torch.Generator().manual_seed(split_seed)))
    else:  # train, or val (and test without an official one) carved out of the official train split
        carve = 0.0 if has_val else val_fraction
        labels = torch.tensor(source.train.labels, dtype=torch.int64)
        train_indices, val_indices = _split_indices(labels, carve, split_seed)
        result = _take(decoded("train"), train_indices if split == "train" else val_indices)

    if len(result) == 0:
        raise UserError(f"the {split} split of {name} at {root} holds no images")
    if split == "train" and subset is not None:
        result = _take(result, _stratified_sample(result.labels, subset, split_seed + 1))
    return result


# ---------------------------------------------------------------------------------------------
# Registry (imported last: the loader modules use RawSplit and Source from above)

from data import celeba, cifar, flowers, folder  # noqa: E402

DATASETS: dict[str, DatasetSpec] = {
    "cifar10_catdog": DatasetSpec(cifar.load_cifar10_catdog, 32, "CIFAR-10 cats vs dogs (2 classes)"),
    "cifar10": DatasetSpec(cifar.load_cifar10, 32, "CIFAR-10, all 10 classes"),
    "folder": DatasetSpec(folder.load_folder, 32, "an image-folder tree: <root>/train/<class>/*, "
                                                  "optional <root>/test/<class>/*"),
    "celeba_smiling": DatasetSpec(celeba.load_celeba, 64, "CelebA aligned faces, 2 classes by one attribute "
                                                          "(default Smiling)", options=("attribute",)),
    "flowers102": DatasetSpec(flowers.load_flowers102, 64, "Oxford Flowers102 (102 classes)",
                              options=("flowers_splits",)),
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def dataset_options(name: str) -> tuple[str, ...]:
    """The loading options (attribute, flowers_splits) a dataset takes; an unknown name takes
    them all, so that its own error is the one raised."""
    return DATASETS[name].options if name in DATASETS else ("attribute", "flowers_splits")


def default_image_size(name: str) -> int:
    return _spec(name).default_image_size


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]
