"""Any ImageFolder tree: `<root>/train/<class>/*` plus optional `<root>/val/<class>/*` and
`<root>/test/<class>/*`, or `<root>/<class>/*` used as the train split."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from data import RawSplit, Source
from errors import UserError


def load_folder(root: Path, download: bool = False) -> Source:  # download: nothing to fetch for a local folder
    layout = f"expected {root}/train/<class>/<images> (one folder per class, at least two classes; " \
             f"optionally {root}/test/<class>/<images>)"
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; {layout}")
    has_train = (root / "train").is_dir()
    if not has_train and (root / "test").is_dir():
        raise UserError(f"{root} has a test/ folder but no train/ folder; {layout}")

    train_dir = root / "train" if has_train else root
    class_names, train = _read(train_dir, layout)
    if len(class_names) < 2:
        raise UserError(f"{train_dir} has only one class folder ({class_names[0]}); a class-conditional model "
                        f"needs at least two; {layout}")
    held_out = {}
    for split in ("val", "test"):
        if has_train and (root / split).is_dir():
            split_classes, held_out[split] = _read(root / split, layout)
            if split_classes != class_names:
                raise UserError(f"class folders of {root / split} ({', '.join(split_classes)}) differ from those of "
                                f"{train_dir} ({', '.join(class_names)}); they must match")
    return Source(class_names, train, **held_out)


def _read(directory: Path, layout: str) -> tuple[list[str], RawSplit]:
    try:
        dataset = ImageFolder(str(directory))  # lists files only; decoding happens later
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise UserError(f"image folder {directory}: {error} ({layout})") from error
    files, labels = zip(*dataset.samples)
    return dataset.classes, RawSplit(list(files), list(labels))
