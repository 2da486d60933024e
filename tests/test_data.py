"""The data layer: every dataset through load_dataset, the split rule, bad input, DeviceBatcher."""
import re
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
from data import load_dataset, safe_name, to_float, to_uint8
from data.batcher import DeviceBatcher
from errors import UserError
from fixtures import CIFAR10_CLASSES, make_celeba, make_image_folder


def image_set(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def check_shapes(split: data.ImageSet, count: int, size: int, num_classes: int) -> None:
    assert split.images.shape == (count, 3, size, size) and split.images.dtype == torch.uint8
    assert split.labels.shape == (count,) and split.labels.dtype == torch.int64
    assert len(split.class_names) == num_classes
    assert 0 <= split.labels.min() and split.labels.max() < num_classes


def raise_offline(*args, **kwargs):
    raise RuntimeError("no network")


# --- registry and helpers -------------------------------------------------------------------------

def test_registry():
    assert data.dataset_names() == ["cifar10_catdog", "cifar10", "folder", "celeba_smiling", "flowers102"]
    assert [data.default_image_size(name) for name in data.dataset_names()] == [32, 32, 32, 64, 64]
    assert all(spec.description for spec in data.DATASETS.values())
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose one of: cifar10_catdog"):
        load_dataset("mnist", None, "train")
    with pytest.raises(UserError, match="choose one of"):
        data.default_image_size("mnist")


def test_float_conversions_round_trip():
    images = torch.arange(256, dtype=torch.uint8)
    x = to_float(images)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), images)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_safe_name():
    assert safe_name("bishop of llandaff") == "bishop_of_llandaff"
    assert safe_name("colt's foot") == "colt_s_foot"
    assert safe_name("pink-yellow dahlia?") == "pink-yellow_dahlia"
    assert safe_name("Not Smiling") == "Not_Smiling"


def test_square_crop_resize_keeps_the_centre():
    landscape = np.zeros((20, 24, 3), np.uint8)
    landscape[:, :, 1] = 255  # green centre ...
    landscape[:, :2] = landscape[:, -2:] = (255, 0, 0)  # ... red strips that fall outside the 20x20 square
    result = np.asarray(data.square_crop_resize(Image.fromarray(landscape), 8))
    assert result.shape == (8, 8, 3) and result[..., 0].max() == 0

    portrait = np.full((30, 20, 3), 255, np.uint8)
    portrait[:5] = portrait[-5:] = 0  # black bands above and below the 20x20 square
    assert np.asarray(data.square_crop_resize(Image.fromarray(portrait), 10)).min() == 255


# --- CIFAR-10 --------------------------------------------------------------------------------------

def test_cifar10(cifar10_root):
    test = load_dataset("cifar10", cifar10_root, "test")
    check_shapes(test, 40, 32, 10)
    assert test.class_names == CIFAR10_CLASSES
    assert test.labels.bincount().tolist() == [4] * 10
    # Official train (80) has no validation split: 10% carved out per class.
    assert len(load_dataset("cifar10", cifar10_root, "train")) == 70
    assert load_dataset("cifar10", cifar10_root, "val").labels.bincount().tolist() == [1] * 10
    # The fixture's classes are separable: nearest class mean on train classifies all test images.
    train = load_dataset("cifar10", cifar10_root, "train")
    means = torch.stack([train.images[train.labels == c].float().mean((0, 2, 3)) for c in range(10)])
    predicted = torch.cdist(test.images.float().mean((2, 3)), means).argmin(1)
    assert torch.equal(predicted, test.labels)
    # Root may also be the batches folder itself.
    assert torch.equal(load_dataset("cifar10", cifar10_root / "cifar-10-batches-py", "test").images, test.images)


def test_cifar10_catdog_relabels(cifar10_root):
    full = load_dataset("cifar10", cifar10_root, "test")
    catdog = load_dataset("cifar10_catdog", cifar10_root, "test")
    check_shapes(catdog, 8, 32, 2)
    assert catdog.class_names == ["cat", "dog"]
    assert image_set(catdog.images[catdog.labels == 0]) == image_set(full.images[full.labels == 3])
    assert image_set(catdog.images[catdog.labels == 1]) == image_set(full.images[full.labels == 5])
    assert len(load_dataset("cifar10_catdog", cifar10_root, "train")) == 14  # 16 minus one val image per class


def test_cifar_errors(tmp_path, image_folder_root):
    with pytest.raises(UserError, match=r"looked for .*cifar-10-batches-py.*--download.*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10_catdog", tmp_path, "train")
    with pytest.raises(UserError, match="use --dataset folder"):
        load_dataset("cifar10_catdog", image_folder_root, "train")


@pytest.mark.parametrize("name, torchvision_class, shown", [
    ("cifar10", "CIFAR10", "CIFAR-10"), ("celeba_smiling", "CelebA", "CelebA"), ("flowers102", "Flowers102", "Flowers102")])
def test_download_is_refused_offline_and_a_failed_one_is_one_clear_error(tmp_path, monkeypatch, name,
                                                                         torchvision_class, shown):
    calls = []
    monkeypatch.setattr(torchvision.datasets, torchvision_class, lambda *a, **k: calls.append(a) or raise_offline())
    with pytest.raises(UserError, match=f"SUITE_OFFLINE=1 forbids downloading {shown}; unset it, or download"):
        load_dataset(name, tmp_path, "train", download=True)  # the tests run with SUITE_OFFLINE=1
    assert calls == []
    monkeypatch.delenv("SUITE_OFFLINE")
    with pytest.raises(UserError, match=f"could not download {shown}.*no network.*by hand"):
        load_dataset(name, tmp_path, "train", download=True)
    assert len(calls) == 1


# --- the split rule --------------------------------------------------------------------------------

def test_val_carve_out_is_disjoint_stratified_and_seeded(cifar10_root):
    train = load_dataset("cifar10", cifar10_root, "train")
    val = load_dataset("cifar10", cifar10_root, "val")
    everything = load_dataset("cifar10", cifar10_root, "train", val_fraction=0)
    assert len(everything) == 80 and not image_set(train.images) & image_set(val.images)
    assert image_set(train.images) | image_set(val.images) == image_set(everything.images)

    data.clear_cache()  # decode again: the split depends on the seed only
    assert torch.equal(load_dataset("cifar10", cifar10_root, "val").images, val.images)
    other = load_dataset("cifar10", cifar10_root, "val", split_seed=1)
    assert image_set(other.images) != image_set(val.images)
    assert sorted(other.labels.tolist()) == list(range(10))  # still one image per class


def test_subset_is_a_seeded_sample_with_each_class_share(cifar10_root):
    train = load_dataset("cifar10", cifar10_root, "train")  # 7 images of each of 10 classes
    subset = load_dataset("cifar10", cifar10_root, "train", subset=20)
    assert image_set(subset.images) < image_set(train.images)
    assert subset.labels.bincount(minlength=10).tolist() == [2] * 10  # each class's share, exactly
    assert torch.equal(load_dataset("cifar10", cifar10_root, "train", subset=20).images, subset.images)
    assert len(load_dataset("cifar10", cifar10_root, "train", subset=10_000)) == 70
    assert len(load_dataset("cifar10", cifar10_root, "val", subset=1)) == 10  # only train is cut


def test_split_digest_fingerprints_the_labelled_images_not_their_order():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    digest = data.split_digest(images, labels)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert data.split_digest(images[order], labels[order]) == digest
    assert data.split_digest(images, labels.flip(0)) != digest  # the same pictures, other labels
    changed = images.clone()
    changed[2, 0, 0, 0] ^= 1
    assert data.split_digest(changed, labels) != digest and data.split_digest(images[:5], labels[:5]) != digest


def test_each_class_holds_out_its_own_share():
    labels = torch.tensor([0] * 30 + [1] * 15 + [2] * 2)
    train, val = data._split_indices(labels, 0.1, seed=0)
    # round(3.0), round(1.5) and at least one, leaving at least one for training
    assert labels[val].bincount().tolist() == [3, 2, 1] and labels[train].bincount().tolist() == [27, 13, 1]


def test_stratified_sample_keeps_class_shares_where_a_prefix_of_the_carved_split_does_not():
    # Carving held-out images from the front of each class's run of a permutation leaves the
    # train split's first images short of the classes that came late: the sample must not be.
    labels = torch.arange(10).repeat_interleave(1000)
    train, _ = data._split_indices(labels, 0.1, seed=0)
    for count in (100, 500, 3333):
        shares = labels[train][data._stratified_sample(labels[train], count, seed=1)].bincount(minlength=10)
        assert shares.sum() == count and shares.max() - shares.min() <= 1
    assert labels[train[:100]].bincount(minlength=10).min() <= 1  # what the prefix gave


def test_official_held_out_splits_come_in_a_seeded_class_mixed_order(tmp_path):
    root = make_image_folder(tmp_path / "sorted", classes=("a", "b", "c"), n_train=6, n_test=6)
    test = load_dataset("folder", root, "test")  # the files are listed class by class
    assert len(set(test.labels[:6].tolist())) > 1 and sorted(test.labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    data.clear_cache()
    assert torch.equal(load_dataset("folder", root, "test").images, test.images)  # the same order again


def test_val_fraction_zero(cifar10_root, tmp_path):
    val = load_dataset("cifar10", cifar10_root, "val", val_fraction=0)
    assert torch.equal(val.images, load_dataset("cifar10", cifar10_root, "test").images)
    no_test = make_image_folder(tmp_path, n_train=2, with_test=False)
    with pytest.raises(UserError, match="no official validation or test split.*val_fraction"):
        load_dataset("folder", no_test, "train", val_fraction=0)


@pytest.mark.parametrize("arguments, message", [
    (dict(split="dev"), "unknown split 'dev'"),
    (dict(split="train", val_fraction=1.0), "val_fraction must be in"),
    (dict(split="train", subset=0), "subset must be a positive"),
])
def test_bad_arguments(cifar10_root, arguments, message):
    with pytest.raises(UserError, match=message):
        load_dataset("cifar10", cifar10_root, **arguments)


def test_second_split_comes_from_the_cache(tmp_path):
    root = make_image_folder(tmp_path, n_train=5, with_test=False)
    train = load_dataset("folder", root, "train")
    shutil.rmtree(root / "train")
    val = load_dataset("folder", root, "val")  # carved from the cached train decode, no file access
    assert len(train) == 8 and len(val) == 2


# --- image folders ---------------------------------------------------------------------------------

def test_folder(image_folder_root):
    train = load_dataset("folder", image_folder_root, "train")
    check_shapes(train, 22, 32, 2)
    assert train.class_names == ["cat", "dog"]
    check_shapes(load_dataset("folder", image_folder_root, "test", image_size=16), 8, 16, 2)


def test_folder_without_train_subfolder(image_folder_root):
    root = image_folder_root / "train"  # class folders directly under root: the train split
    val = load_dataset("folder", root, "val")
    assert len(val) == 2 and torch.equal(load_dataset("folder", root, "test").images, val.images)


def break_folder(root, case):
    if case == "missing root":
        return root / "nowhere"
    if case == "no class folders":
        (root / "train").mkdir()
        return root
    make_image_folder(root, n_train=2, n_test=1)
    if case == "one class":
        shutil.rmtree(root / "train" / "dog")
    elif case == "empty class":
        shutil.rmtree(root / "train" / "dog")
        (root / "train" / "dog").mkdir()
    elif case == "unreadable image":
        (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    elif case == "test classes differ":
        (root / "test" / "dog").rename(root / "test" / "wolf")
    elif case == "test without train":
        shutil.rmtree(root / "train")
    return root


@pytest.mark.parametrize("case, message", [
    ("missing root", "nowhere does not exist; expected .*train/<class>/<images>"),
    ("no class folders", "find any class folder"),
    ("one class", "only one class folder \\(cat\\)"),
    ("empty class", "no valid file for the classes dog"),
    ("unreadable image", "cannot read image .*broken.png"),
    ("test classes differ", "class folders of .*test \\(cat, wolf\\) differ"),
    ("test without train", "test/ folder but no train/"),
])
def test_folder_errors(tmp_path, case, message):
    with pytest.raises(UserError, match=message):
        load_dataset("folder", break_folder(tmp_path, case), "train")


# --- CelebA ----------------------------------------------------------------------------------------

def test_celeba(celeba_root):
    splits = {split: load_dataset("celeba_smiling", celeba_root, split) for split in data.SPLITS}
    for split, count in [("train", 12), ("val", 6), ("test", 6)]:  # the official partitions
        check_shapes(splits[split], count, 64, 2)
    assert splits["train"].class_names == ["Not Smiling", "Smiling"]
    assert sorted(splits["train"].labels.tolist()) == [0] * 8 + [1] * 4  # fixture: Smiling when i % 3 == 0
    # The fixture draws Smiling faces with a brighter lower half.
    images = splits["train"].images.float()
    brighter_below = images[:, :, 40:].mean((1, 2, 3)) - images[:, :, :24].mean((1, 2, 3)) > 20
    assert torch.equal(brighter_below, splits["train"].labels.bool())
    # Root may be the folder with the files or its parent holding celeba/.
    assert torch.equal(load_dataset("celeba_smiling", celeba_root.parent, "val").images, splits["val"].images)


def test_celeba_layouts_agree(celeba_root, celeba_kaggle_root, tmp_path):
    """Also the Kaggle CSVs saved again by Excel ("CSV UTF-8"), which puts a byte-order mark first."""
    bom = tmp_path / "bom"
    shutil.copytree(celeba_kaggle_root, bom)
    for name in ("list_attr_celeba.csv", "list_eval_partition.csv"):
        (bom / name).write_bytes(b"\xef\xbb\xbf" + (bom / name).read_bytes())
    for split in data.SPLITS:
        official = load_dataset("celeba_smiling", celeba_root, split)
        for root in (celeba_kaggle_root, bom):
            kaggle = load_dataset("celeba_smiling", root, split)
            assert torch.equal(official.images, kaggle.images) and torch.equal(official.labels, kaggle.labels)


def test_celeba_attribute(celeba_root):
    assert load_dataset("celeba_smiling", celeba_root, "val", attribute="Wearing_Hat").class_names == \
        ["Not Wearing Hat", "Wearing Hat"]
    with pytest.raises(UserError, match="unknown CelebA attribute 'Smile'; valid attributes: 5_o_Clock.*Smiling"):
        load_dataset("celeba_smiling", celeba_root, "train", attribute="Smile")


def test_celeba_crop_is_proportional(tmp_path):
    full = make_celeba(tmp_path / "full", n=4, size=(178, 218), partitions=(2,))
    half = make_celeba(tmp_path / "half", n=4, size=(89, 109), partitions=(2,))
    full, half = (load_dataset("celeba_smiling", root, "test").images.float() for root in (full, half))
    assert (full - half).abs().mean() < 3  # of 255: the same crop, up to resampling and JPEG
    assert (full - half.flip(2)).abs().mean() > 10  # while a different picture is far off


def test_celeba_skips_missing_images(tmp_path, capsys, monkeypatch):
    root = make_celeba(tmp_path)
    for name in ("000001.jpg", "000005.jpg", "000004.jpg"):  # partitions 0, 0, 2 (pattern 0, 0, 1, 2)
        (root / "img_align_celeba" / name).unlink()
    train = load_dataset("celeba_smiling", root, "train")
    note = capsys.readouterr().err.splitlines()  # one line, no source line of a Python warning
    assert len(note) == 1 and re.match(r"note: CelebA: skipped 3 images .*\(train 2, val 0, test 1\)$", note[0])
    data.clear_cache()
    monkeypatch.setenv("RANK", "1")  # under torchrun the first process alone says it
    assert len(load_dataset("celeba_smiling", root, "train")) == 10 and capsys.readouterr().err == ""
    assert len(train) == 10 and len(load_dataset("celeba_smiling", root, "test")) == 5


def test_celeba_without_validation_partition_carves_val(tmp_path):
    root = make_celeba(tmp_path, n=20, partitions=(0,))  # like the shared partial copy: all train
    train, val, test = (load_dataset("celeba_smiling", root, split) for split in data.SPLITS)
    assert (len(train), len(val)) == (18, 2) and sorted(val.labels.tolist()) == [0, 1]
    assert torch.equal(test.images, val.images)


def test_celeba_errors(tmp_path):
    with pytest.raises(UserError, match=r"list_attr_celeba\.txt.*list_attr_celeba\.csv.*--download.*celeba-dataset"):
        load_dataset("celeba_smiling", tmp_path, "train")


# --- Flowers102 ------------------------------------------------------------------------------------

def test_flowers102_official_and_pooled_splits(flowers102_root):
    official = {split: load_dataset("flowers102", flowers102_root, split, flowers_splits="official")
                for split in data.SPLITS}
    for split in data.SPLITS:
        check_shapes(official[split], 102, 64, 102)
        assert official[split].labels.bincount().tolist() == [1] * 102
    names = official["train"].class_names
    assert (names[0], names[55], names[101]) == ("pink primrose", "bishop of llandaff", "blackberry lily")

    pooled = {split: load_dataset("flowers102", flowers102_root, split) for split in data.SPLITS}  # "all"
    check_shapes(pooled["train"], 204, 64, 102)
    assert pooled["train"].labels.bincount().tolist() == [2] * 102  # every class on both sides
    assert pooled["val"].labels.bincount().tolist() == [1] * 102
    assert torch.equal(pooled["test"].images, pooled["val"].images)


def test_flowers102_errors(tmp_path, flowers102_root):
    with pytest.raises(UserError, match=r"flowers-102/ with jpg/, imagelabels\.mat and setid\.mat; pass --download"):
        load_dataset("flowers102", tmp_path, "train")
    with pytest.raises(UserError, match="unknown flowers_splits 'some'"):
        load_dataset("flowers102", flowers102_root, "train", flowers_splits="some")


def _spoil(root, name, content):
    path = next(root.rglob(name))
    if callable(content):
        content(path)
    else:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _rewrite_pickle(change):
    def rewrite(path):
        import pickle
        with open(path, "rb") as file:
            entry = pickle.load(file, encoding="latin1")
        with open(path, "wb") as file:
            pickle.dump(change(entry), file)
    return rewrite


def _edit_text(change):
    return lambda path: path.write_text(change(path.read_text()))


MALFORMED = {  # dataset, file, what to write or do to it, the error's words
    "cifar batch without data": ("cifar10_catdog", "data_batch_1", _rewrite_pickle(lambda e: {"labels": e["labels"]}),
                                 r"data_batch_1 \(KeyError: 'data'\); re-download"),
    "cifar batch of the wrong width": ("cifar10", "data_batch_2", _rewrite_pickle(lambda e: {**e, "data": e["data"][:, :100]}),
                                       r"data_batch_2 \(ValueError: cannot reshape"),
    "cifar label out of range": ("cifar10", "test_batch", _rewrite_pickle(lambda e: {**e, "labels": [12] * len(e["labels"])}),
                                 r"test_batch \(ValueError: labels outside 0\.\.9\)"),
    "cifar meta without names": ("cifar10", "batches.meta", _rewrite_pickle(lambda e: {"names": []}),
                                 r"batches\.meta \(KeyError: 'label_names'\)"),
    "celeba partition code 3": ("celeba_smiling", "list_eval_partition.txt", _edit_text(lambda t: t.replace(" 0", " 3", 1)),
                                r"list_eval_partition\.txt \(KeyError: '3'\); download it again"),
    "celeba short partition row": ("celeba_smiling", "list_eval_partition.txt", _edit_text(lambda t: t + "000099.jpg\n"),
                                   r"list_eval_partition\.txt \(ValueError: not enough values"),
    "celeba empty attribute file": ("celeba_smiling", "list_attr_celeba.txt", "", r"list_attr_celeba\.txt \(IndexError"),
    "celeba binary attribute file": ("celeba_smiling", "list_attr_celeba.txt", bytes(range(128, 256)) * 8,
                                     r"list_attr_celeba\.txt \(UnicodeDecodeError"),
    "flowers labels as an HTML page": ("flowers102", "imagelabels.mat", "<html>quota exceeded</html>",
                                       r"imagelabels\.mat \(.*\); download it again from https://"),
    "flowers empty setid": ("flowers102", "setid.mat", b"", r"setid\.mat \(MatReadError"),
    "flowers setid without trnid": ("flowers102", "setid.mat",
                                    lambda path: __import__("scipy.io").io.savemat(path, {"valid": np.arange(1, 3)}),
                                    r"setid\.mat \(KeyError: 'trnid'\)"),
}


def test_16_bit_greyscale_images_are_scaled_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(levels).save(tmp_path / "train" / name / f"{i}.png")  # read back as mode I;16
    images = load_dataset("folder", tmp_path, "val", val_fraction=0.5).images
    expected = torch.from_numpy(np.round(levels / 257.0).astype(np.uint8))
    assert torch.equal(images[0, 0], expected) and torch.equal(images[0, 2], expected)


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_metadata_is_one_clear_error(tmp_path, case):
    from fixtures import make_cifar10, make_flowers102
    name, file_name, content, message = MALFORMED[case]
    make = {"cifar10_catdog": make_cifar10, "cifar10": make_cifar10, "celeba_smiling": make_celeba,
            "flowers102": make_flowers102}[name]
    root = make(tmp_path / "data")
    _spoil(root, file_name, content)
    with pytest.raises(UserError, match=message):
        load_dataset(name, root, "train")


# --- DeviceBatcher ---------------------------------------------------------------------------------

@pytest.fixture
def random_images():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(50)


def batches(batcher, epoch):
    return [(x.clone(), y.clone()) for x, y in batcher.epoch(epoch)]


def test_batcher_shapes_and_range(random_images):
    images, labels = random_images
    batcher = DeviceBatcher(images, labels, 8, "cpu")
    assert len(batcher) == 6 and len(DeviceBatcher(images, labels, 8, "cpu", drop_last=False)) == 7
    epoch = batches(batcher, 0)
    assert len(epoch) == 6
    for x, y in epoch:
        assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert -1 <= x.min() and x.max() <= 1
    assert len(torch.cat([y for _, y in epoch]).unique()) == 48  # no repeats within an epoch
    assert batches(DeviceBatcher(images, labels, 8, "cpu", drop_last=False), 0)[-1][0].shape[0] == 2
    with pytest.raises(UserError, match="50 training images make no full batch of 64"):
        DeviceBatcher(images, labels, 64, "cpu")


def test_batcher_is_reproducible_per_epoch(random_images):
    images, labels = random_images
    first, again = (batches(DeviceBatcher(images, labels, 8, "cpu", seed=3), 5) for _ in range(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    next_epoch = batches(DeviceBatcher(images, labels, 8, "cpu", seed=3), 6)
    assert not torch.equal(first[0][1], next_epoch[0][1])


def test_batcher_ranks_take_disjoint_shards(random_images):
    images, labels = random_images
    ranks = [DeviceBatcher(images, labels, 5, "cpu", rank=rank, world_size=2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    seen = [torch.cat([y for _, y in rank.epoch(0)]) for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 25 and not set(seen[0].tolist()) & set(seen[1].tolist())


def test_batcher_passes_float_tensors_through():
    latents = torch.randn(50, 4, 4, 4)
    x, y = next(DeviceBatcher(latents, torch.arange(50), 10, "cpu", flip=False).epoch(0))
    assert torch.equal(x, latents[y])


def test_batcher_flips_some_samples(random_images):
    images, labels = random_images
    flipped = []
    for x, y in DeviceBatcher(images, labels, 10, "cpu").epoch(0):
        original = to_float(images[y])
        is_flipped = (x == original.flip(3)).flatten(1).all(1)
        assert torch.equal(is_flipped, ~(x == original).flatten(1).all(1))  # each sample: one or the other
        flipped.append(is_flipped)
    assert 0 < torch.cat(flipped).float().mean() < 1
    x, y = next(DeviceBatcher(images, labels, 10, "cpu", flip=False).epoch(0))
    assert torch.equal(x, to_float(images[y]))


def test_a_class_is_found_by_its_name_without_the_shells_glob_characters():
    """Flowers102's "pink-yellow dahlia?" (torchvision's name) as users type it, or as its folder's name."""
    from types import SimpleNamespace

    from data.flowers import CLASS_NAMES
    from pipeline import Pipeline
    flowers = SimpleNamespace(class_names=CLASS_NAMES)
    dahlia = CLASS_NAMES.index("pink-yellow dahlia?")
    for typed in ("pink-yellow dahlia?", "Pink-Yellow Dahlia", "pink-yellow_dahlia"):
        assert Pipeline.class_index(flowers, typed) == dahlia, typed
    assert Pipeline.class_index(flowers, "colt's foot") == CLASS_NAMES.index("colt's foot")
    with pytest.raises(UserError, match="unknown class 'dahlia'"):
        Pipeline.class_index(flowers, "dahlia")


def test_a_subset_larger_than_the_training_split_takes_all_of_it_and_says_so(tmp_path, capsys):
    from config import Config
    from fixtures import make_image_folder
    from training.runner import load_split
    root = make_image_folder(tmp_path / "data", n_train=8, n_test=2, size=16)
    cfg = Config(dataset="folder", data_root=str(root), image_size=16, subset=1000)
    train = load_split(cfg, "train")
    note = capsys.readouterr().err.strip()
    assert note == f"note: --subset 1000 is more than the {len(train)} training images: all of them are used"
    load_split(Config(dataset="folder", data_root=str(root), image_size=16, subset=4), "train")
    assert capsys.readouterr().err == ""
