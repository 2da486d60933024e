"""Shared pytest setup: import paths, a headless matplotlib, and the tiny on-disk datasets."""
import os
import sys
from pathlib import Path

os.environ["MPLBACKEND"] = "Agg"  # no display on CI machines
os.environ["SUITE_OFFLINE"] = "1"  # never try a download (a firewalled CI can hang on one)
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # the project's packages and tests/fixtures.py

import pytest  # noqa: E402

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """Holds cifar-10-batches-py/ (8 train and 4 test images per class)."""
    return fixtures.make_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory):
    """Holds train/{cat,dog}/ (12 each) and test/{cat,dog}/ (4 each), 32x32 PNGs."""
    return fixtures.make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory):
    """The official CelebA layout, 24 images (89x109) in partitions 12 train / 6 val / 6 test."""
    return fixtures.make_celeba(tmp_path_factory.mktemp("celeba") / "celeba", layout="official")


@pytest.fixture(scope="session")
def celeba_kaggle_root(tmp_path_factory):
    """The same images and labels as celeba_root, in the Kaggle layout."""
    return fixtures.make_celeba(tmp_path_factory.mktemp("celeba_kaggle"), layout="kaggle")


@pytest.fixture(scope="session")
def flowers102_root(tmp_path_factory):
    """Holds flowers-102/: 3 images (24x20) per class, one each in the official train/val/test."""
    return fixtures.make_flowers102(tmp_path_factory.mktemp("flowers102"))
