"""CIFAR-10 from its official python pickle batches (`<root>/cifar-10-batches-py/`).

The pickles are read here with torchvision's own logic (pickle.load(..., encoding="latin1"), keys
"data"/"labels", meta "label_names") rather than through torchvision.datasets.CIFAR10, because that
class rejects any copy whose md5 differs from the official files (re-packed copies, test fixtures).
torchvision is still what downloads the archive.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from data import RawSplit, Source, check_download_allowed, reading
from errors import UserError

BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
REDOWNLOAD = "re-download it with --download"


def load_cifar10(root: Path, download: bool = False) -> Source:
    return _load(root, download, keep=None)


def load_cifar10_catdog(root: Path, download: bool = False) -> Source:
    return _load(root, download, keep=["cat", "dog"])


def _load(root: Path, download: bool, keep: list[str] | None) -> Source:
    folder = _find_batches(root, download)
    meta = _unpickle(folder / META_FILE)
    with reading(folder / META_FILE, REDOWNLOAD):
        class_names = [str(name) for name in meta["label_names"]]
        # e.g. cat 3 -> 0, dog 5 -> 1
        relabel = None if keep is None else {class_names.index(name): new for new, name in enumerate(keep)}
    train, test = (_read_batches(folder, files, len(class_names)) for files in (TRAIN_FILES, TEST_FILES))
    if keep is None:
        return Source(class_names, train, test=test)
    return Source(keep, _keep_classes(train, relabel), test=_keep_classes(test, relabel))


def _find_batches(root: Path, download: bool) -> Path:
    needed = TRAIN_FILES + TEST_FILES + [META_FILE]
    for folder in (root / BATCHES_FOLDER, root):  # also accept root pointing at the batches folder itself
        if all((folder / name).is_file() for name in needed):
            return folder
    if download:
        import torchvision

        check_download_allowed("CIFAR-10", f"download cifar-10-python.tar.gz from {HOMEPAGE} and extract it in {root}")
        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as error:  # no network, bad archive, disk full: all end the same way
            raise UserError(f"could not download CIFAR-10 into {root} ({error}); download cifar-10-python.tar.gz "
                            f"by hand from {HOMEPAGE} and extract it in {root}") from error
        return root / BATCHES_FOLDER
    if (root / "train").is_dir():
        raise UserError(f"{root} holds an image-folder tree (train/<class>/...), not CIFAR-10's python batches; "
                        f"use --dataset folder for it")
    raise UserError(f"CIFAR-10 not found: looked for {root / BATCHES_FOLDER}/ with {', '.join(needed)}; pass "
                    f"--download, or download cifar-10-python.tar.gz from {HOMEPAGE} and extract it in {root}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return pickle.load(file, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise UserError(f"cannot read CIFAR-10 file {path} ({error}); {REDOWNLOAD}") from error


def _read_batches(folder: Path, names: list[str], num_classes: int) -> RawSplit:
    pixels, labels = [], []
    for name in names:
        entry = _unpickle(folder / name)
        with reading(folder / name, REDOWNLOAD):
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = [int(label) for label in entry.get("labels", entry.get("fine_labels"))]
            if len(batch_labels) != len(data):
                raise ValueError(f"{len(data)} images but {len(batch_labels)} labels")
            if batch_labels and not 0 <= min(batch_labels) <= max(batch_labels) < num_classes:
                raise ValueError(f"labels outside 0..{num_classes - 1}")
        pixels.append(data)
        labels += batch_labels
    # uint8 [N, 32, 32, 3] like torchvision's CIFAR10.data
    return RawSplit(np.concatenate(pixels).transpose(0, 2, 3, 1), labels)


def _keep_classes(raw: RawSplit, relabel: dict[int, int]) -> RawSplit:
    keep = np.isin(raw.labels, list(relabel))
    return RawSplit(raw.images[keep], [relabel[label] for label in raw.labels if label in relabel])
