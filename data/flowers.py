"""Oxford Flowers102: `<root>/flowers-102/` with jpg/image_XXXXX.jpg, imagelabels.mat and setid.mat.

The two .mat files are read here with scipy, exactly as torchvision's Flowers102 reads them, because that
class rejects any copy whose .mat md5s differ from the official ones (test fixtures). torchvision is still
what downloads the files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data import RawSplit, Source, check_download_allowed, reading
from errors import UserError

HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
SET_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # setid.mat keys, 1-based image ids

# Index = label. Same list as Flowers102.classes, which only recent torchvision versions have.
CLASS_NAMES = [
    'pink primrose', 'hard-leaved pocket orchid', 'canterbury bells', 'sweet pea', 'english marigold',
    'tiger lily', 'moon orchid', 'bird of paradise', 'monkshood', 'globe thistle', 'snapdragon',
    "colt's foot", 'king protea', 'spear thistle', 'yellow iris', 'globe-flower', 'purple coneflower',
    'peruvian lily', 'balloon flower', 'giant white arum lily', 'fire lily', 'pincushion flower',
    'fritillary', 'red ginger', 'grape hyacinth', 'corn poppy', 'prince of wales feathers',
    'stemless gentian', 'artichoke', 'sweet william', 'carnation', 'garden phlox', 'love in the mist',
    'mexican aster', 'alpine sea holly', 'ruby-lipped cattleya', 'cape flower', 'great masterwort',
    'siam tulip', 'lenten rose', 'barbeton daisy', 'daffodil', 'sword lily', 'poinsettia', 'bolero deep blue',
    'wallflower', 'marigold', 'buttercup', 'oxeye daisy', 'common dandelion', 'petunia', 'wild pansy',
    'primula', 'sunflower', 'pelargonium', 'bishop of llandaff', 'gaura', 'geranium', 'orange dahlia',
    'pink-yellow dahlia?', 'cautleya spicata', 'japanese anemone', 'black-eyed susan', 'silverbush',
    'californian poppy', 'osteospermum', 'spring crocus', 'bearded iris', 'windflower', 'tree poppy',
    'gazania', 'azalea', 'water lily', 'rose', 'thorn apple', 'morning glory', 'passion flower', 'lotus',
    'toad lily', 'anthurium', 'frangipani', 'clematis', 'hibiscus', 'columbine', 'desert-rose', 'tree mallow',
    'magnolia', 'cyclamen', 'watercress', 'canna lily', 'hippeastrum', 'bee balm', 'ball moss', 'foxglove',
    'bougainvillea', 'camellia', 'mallow', 'mexican petunia', 'bromelia', 'blanket flower', 'trumpet creeper',
    'blackberry lily',
]


def load_flowers102(root: Path, download: bool = False, flowers_splits: str = "all") -> Source:
    """flowers_splits="official": torchvision's train/val/test (1020/1020/6149 images);
    "all": the three pooled as one train split, from which load_dataset carves a stratified val."""
    if flowers_splits not in ("all", "official"):
        raise UserError(f"unknown flowers_splits {flowers_splits!r}; choose 'all' or 'official'")
    folder = next((folder for folder in (root / "flowers-102", root) if _complete(folder)), None)
    if folder is None and download:
        import torchvision

        check_download_allowed("Flowers102", f"download 102flowers.tgz, imagelabels.mat and setid.mat from "
                                             f"{HOMEPAGE} into {root / 'flowers-102'} and extract the .tgz there")
        try:
            torchvision.datasets.Flowers102(str(root), download=True)
        except Exception as error:  # no network, bad archive, disk full: all end the same way
            raise UserError(f"could not download Flowers102 into {root / 'flowers-102'} ({error}); download "
                            f"102flowers.tgz, imagelabels.mat and setid.mat by hand from {HOMEPAGE} into it "
                            f"and extract the .tgz there") from error
        folder = root / "flowers-102"
    if folder is None:
        raise UserError(f"Flowers102 not found: looked for {root / 'flowers-102'}/ with jpg/, imagelabels.mat and "
                        f"setid.mat; pass --download, or download 102flowers.tgz, imagelabels.mat and setid.mat "
                        f"from {HOMEPAGE} into {root / 'flowers-102'} and extract the .tgz there")

    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    advice = f"download it again from {HOMEPAGE} (or pass --download after removing it)"
    with reading(folder / "imagelabels.mat", advice, MatReadError, OSError):
        labels = loadmat(folder / "imagelabels.mat")["labels"].ravel().astype(np.int64) - 1  # 1-based in the file
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"labels outside 1..{len(CLASS_NAMES)}")
    with reading(folder / "setid.mat", advice, MatReadError, OSError):
        set_ids = loadmat(folder / "setid.mat")
        ids = {split: set_ids[key].ravel().astype(np.int64) for split, key in SET_KEYS.items()}
        if any(((i < 1) | (i > len(labels))).any() for i in ids.values()):
            raise ValueError(f"image ids outside 1..{len(labels)}, the images imagelabels.mat labels")

    def split_of(image_ids: np.ndarray) -> RawSplit:
        return RawSplit([str(folder / "jpg" / f"image_{i:05d}.jpg") for i in image_ids],
                        [int(labels[i - 1]) for i in image_ids])

    if flowers_splits == "official":
        return Source(CLASS_NAMES, **{split: split_of(image_ids) for split, image_ids in ids.items()})
    return Source(CLASS_NAMES, split_of(np.sort(np.concatenate(list(ids.values())))))


def _complete(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("jpg", "imagelabels.mat", "setid.mat"))
