"""Tiny datasets written in the real on-disk formats, for tests.

Every image is deterministic (seeded by dataset, class and index) and its class is visible: a
class-dependent mean colour plus noise, so even a nearest-mean classifier separates the classes.
Each `make_*` function writes into the given directory and returns the root to pass as `root`.
"""
from __future__ import annotations

import colorsys
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def class_color(label: int, num_classes: int) -> np.ndarray:
    """Evenly spaced hues: clearly different mean colours for up to ~100 classes."""
    return np.array(colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.8)) * 255


def noisy_image(seed: list[int], color: np.ndarray, height: int, width: int, noise: int = 25) -> np.ndarray:
    """uint8 [height, width, 3]: `color` plus uniform noise."""
    rng = np.random.default_rng(seed)
    pixels = color + rng.uniform(-noise, noise, size=(height, width, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def make_cifar10(root, n_per_class_train: int = 8, n_per_class_test: int = 4) -> Path:
    """`<root>/cifar-10-batches-py/` with data_batch_1..5, test_batch and batches.meta.

    The official pickles come from Python 2, so pickle.load(..., encoding="latin1") gives str keys
    ("data", "labels", ...): writing str keys from Python 3 reproduces exactly what readers see.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n_per_class: int, chunks: int, seed: int) -> list[dict]:
        labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), n_per_class))  # mixed, like CIFAR
        pixels = np.stack([noisy_image([seed, i], class_color(label, 10), 32, 32) for i, label in enumerate(labels)])
        data = pixels.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # row-major R, G, B planes
        return [{"batch_label": f"{name} {k + 1} of {chunks}", "labels": [int(label) for label in part_labels],
                 "data": part_data, "filenames": [f"fixture_{seed}_{k}_{i}.png" for i in range(len(part_labels))]}
                for k, (part_labels, part_data)
                in enumerate(zip(np.array_split(labels, chunks), np.array_split(data, chunks)))]

    files = {f"data_batch_{k + 1}": entry for k, entry in enumerate(batch("training batch", n_per_class_train, 5, 1))}
    files["test_batch"] = batch("testing batch", n_per_class_test, 1, 2)[0]
    files["batches.meta"] = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072}
    for name, content in files.items():
        with open(folder / name, "wb") as file:
            pickle.dump(content, file, protocol=2)
    return Path(root)


def make_image_folder(root, classes=("cat", "dog"), n_train: int = 12, n_test: int = 4, size: int = 32,
                      with_test: bool = True) -> Path:
    """`<root>/train/<class>/<i>.png` (and `<root>/test/<class>/<i>.png`), n_* images per class."""
    root = Path(root)
    for split, count in [("train", n_train)] + ([("test", n_test)] if with_test else []):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                color = class_color(label, len(classes))
                pixels = noisy_image([3, int(split == "test"), label, i], color, size, size)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.png")
    return root


def make_celeba(root, layout: str = "official", n: int = 24, size=(89, 109), partitions=(0, 0, 1, 2)) -> Path:
    """CelebA files for images 000001.jpg..: attribute and partition lists plus JPEGs.

    layout "official": list_attr_celeba.txt, list_eval_partition.txt (CRLF, runs of spaces, like the
    real files), img_align_celeba/; "kaggle": the .csv versions and img_align_celeba/img_align_celeba/.
    Image i is in partition partitions[i % len(partitions)] and Smiling when i % 3 == 0; Smiling faces
    have a brighter lower half. Content is drawn at 178x218 and resized to `size`, so different sizes of
    the same fixture show the same picture.
    """
    root = Path(root)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    smiling_column = CELEBA_ATTRIBUTES.index("Smiling")
    rng = np.random.default_rng(4)
    attributes = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    attributes[:, smiling_column] = [1 if i % 3 == 0 else -1 for i in range(n)]
    split_of = [partitions[i % len(partitions)] for i in range(n)]

    image_dir = root / ("img_align_celeba" if layout == "official" else "img_align_celeba/img_align_celeba")
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        # Smooth content (a coarse random grid, upsampled) so that resolution changes keep the picture.
        coarse = noisy_image([5, i], np.full(3, 128.0), 11, 9, noise=60).astype(np.int16)
        coarse[6:] += 60 if attributes[i, smiling_column] == 1 else -30
        face = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((178, 218), Image.Resampling.BICUBIC)
        face.resize(size, Image.Resampling.LANCZOS).save(image_dir / name, quality=95)

    if layout == "official":
        attr_lines = [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
        attr_lines += [name + " " + " ".join(f"{value:2d}" for value in row) for name, row in zip(names, attributes)]
        (root / "list_attr_celeba.txt").write_bytes(("\r\n".join(attr_lines) + "\r\n").encode())
        partition_lines = [f"{name} {split}" for name, split in zip(names, split_of)]
        (root / "list_eval_partition.txt").write_bytes(("\r\n".join(partition_lines) + "\r\n").encode())
    elif layout == "kaggle":
        attr_lines = [",".join(["image_id"] + CELEBA_ATTRIBUTES)]
        attr_lines += [",".join([name] + [str(value) for value in row]) for name, row in zip(names, attributes)]
        (root / "list_attr_celeba.csv").write_text("\n".join(attr_lines) + "\n")
        partition_lines = ["image_id,partition"] + [f"{name},{split}" for name, split in zip(names, split_of)]
        (root / "list_eval_partition.csv").write_text("\n".join(partition_lines) + "\n")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return root


def make_flowers102(root, n_per_class: int = 3, size=(24, 20)) -> Path:
    """`<root>/flowers-102/` with jpg/image_XXXXX.jpg (width x height = size, not square), imagelabels.mat
    and setid.mat for all 102 classes. Per class, the first image is in trnid, the second in valid,
    the rest in tstid (ids 1-based, arrays of shape (1, k), like the official files)."""
    from scipy.io import savemat

    folder = Path(root) / "flowers-102"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(1, 103), n_per_class)  # image id i + 1 has class labels[i] (1-based)
    for i, label in enumerate(labels):
        pixels = noisy_image([6, i], class_color(label - 1, 102), size[1], size[0], noise=10)
        Image.fromarray(pixels).save(folder / "jpg" / f"image_{i + 1:05d}.jpg", quality=95)
    ids = np.arange(1, len(labels) + 1)
    rounds = (ids - 1) // 102  # 0 for each class's first image, 1 for its second, ...
    savemat(folder / "imagelabels.mat", {"labels": labels[None].astype(np.uint8)})
    savemat(folder / "setid.mat", {key: ids[mask][None].astype(np.uint16) for key, mask in
                                   [("trnid", rounds == 0), ("valid", rounds == 1), ("tstid", rounds >= 2)]})
    return Path(root)
