"""CelebA aligned faces, labelled by one binary attribute (default Smiling).

The list files are read here because torchvision's CelebA refuses partial copies (md5 checks, bbox and
landmark files). Two on-disk layouts are accepted, in `<root>` or `<root>/celeba`.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from data import RawSplit, Source, check_download_allowed, reading
from errors import UserError

# layout -> (attribute file, its header rows, partition file, its header rows, image folder)
LAYOUTS = {
    "official": ("list_attr_celeba.txt", 2, "list_eval_partition.txt", 0, "img_align_celeba"),
    "kaggle": ("list_attr_celeba.csv", 1, "list_eval_partition.csv", 1, "img_align_celeba/img_align_celeba"),
}
PARTITIONS = {"0": "train", "1": "val", "2": "test"}
REDOWNLOAD = "download it again (see --download)"
BY_HAND = ('download the Kaggle "celeba-dataset" archive (jessicali9530/celeba-dataset) or the official files '
           'from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and extract them')


def load_celeba(root: Path, download: bool = False, attribute: str = "Smiling") -> Source:
    found = _find(root)
    if found is None and download:
        import torchvision

        check_download_allowed("CelebA", f"{BY_HAND} in {root}")
        try:
            torchvision.datasets.CelebA(str(root), split="all", download=True)
        except Exception as error:  # no network, Google Drive quota, missing gdown: all end the same way
            raise UserError(f"could not download CelebA into {root / 'celeba'} ({error}); get the files by hand: "
                            f"{BY_HAND} in {root}") from error
        found = _find(root)
    if found is None:
        layouts = "; ".join(f"{layout}: {attr}, {part}, {images}/"
                            for layout, (attr, _, part, _, images) in LAYOUTS.items())
        raise UserError(f"CelebA not found in {root} or {root / 'celeba'}: looked for ({layouts}); pass --download "
                        f"(torchvision fetches the official files from Google Drive; needs gdown, often rate-limited) "
                        f"or {BY_HAND} in {root}")
    folder, (attr_file, attr_header, partition_file, partition_header, image_dir) = found

    with reading(folder / attr_file, REDOWNLOAD):
        header, rows = _read_table(folder / attr_file, attr_header)
        names = [name for name in header[-1] if name != "image_id"]  # Kaggle's header starts with image_id
        if attribute not in names:
            raise UserError(f"unknown CelebA attribute {attribute!r}; valid attributes: {', '.join(names)}")
        column = 1 + names.index(attribute)
        is_positive = {row[0]: row[column] == "1" for row in rows}  # values are 1 / -1

    # Keep only images that exist and have attributes: partial copies list far more rows than they hold.
    images = folder / image_dir
    present = set(os.listdir(images))
    splits = {split: RawSplit([], []) for split in PARTITIONS.values()}
    skipped = dict.fromkeys(PARTITIONS.values(), 0)
    with reading(folder / partition_file, REDOWNLOAD):
        for name, partition in _read_table(folder / partition_file, partition_header)[1]:
            split = PARTITIONS[partition]  # codes 0, 1, 2
            if name in present and name in is_positive:
                splits[split].images.append(str(images / name))
                splits[split].labels.append(int(is_positive[name]))
            else:
                skipped[split] += 1
    if any(skipped.values()) and os.environ.get("RANK", "0") == "0":  # once under torchrun
        counts = ", ".join(f"{split} {count}" for split, count in skipped.items())
        print(f"note: CelebA: skipped {sum(skipped.values())} images listed in {folder / partition_file} that are "
              f"missing from {images} or {attr_file} ({counts})", file=sys.stderr)

    shown = attribute.replace("_", " ")
    return Source([f"Not {shown}", shown], **splits)


def _find(root: Path) -> tuple[Path, tuple] | None:
    for folder in (root, root / "celeba"):  # torchvision's download puts the files in <root>/celeba
        for layout in LAYOUTS.values():
            attr_file, _, partition_file, _, image_dir = layout
            if (folder / attr_file).is_file() and (folder / partition_file).is_file() and (folder / image_dir).is_dir():
                return folder, layout
    return None


def _read_table(path: Path, header_rows: int) -> tuple[list[list[str]], list[list[str]]]:
    """(header rows, data rows) of a CelebA list file: official text (runs of spaces) or Kaggle CSV."""
    with open(path, newline="", encoding="utf-8-sig") as file:  # a CSV saved by Excel starts with a BOM
        rows = list(csv.reader(file)) if path.suffix == ".csv" else [line.split() for line in file]
    rows = [row for row in rows if row]
    return rows[:header_rows], rows[header_rows:]
