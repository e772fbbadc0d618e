"""The eleven MTIL datasets, read by torchvision's own dataset classes, with ZSCL's splits.

Every dataset lives under one root (``data/01_raw`` by default) in the folder torchvision's class
reads, so the eleven folders sit side by side (see ``SPECS``). ``download=True`` lets torchvision
fetch a missing dataset when online; offline, or when a folder is missing, one message names the
dataset, the folder and what to put there. torchvision's own checks stay in force: it verifies
the MD5 of CIFAR-100's files before it unpickles them and of Flowers' two .mat files, and refuses
files that differ from the official release.

Splits follow ZSCL (``mtil/src/datasets/collections.py``): the official train / test split where
the dataset has one, an 80/20 random split with seed 42 (``ClassificationDataset.split_dataset``)
for Caltech101, EuroSAT and SUN397.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd

from clip_continual.data import zscl_text
from clip_continual.data.common import DataFormatError
from clip_continual.data.source import SubsetSource

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
RANDOM_SPLIT_TRAIN_FRACTION = 0.8  # ZSCL mtil/src/datasets/collections.py, split_dataset(ratio=0.8)
RANDOM_SPLIT_SEED = 42  # ZSCL mtil/src/datasets/collections.py, torch.Generator().manual_seed(42)

STANFORD_CARS_SOURCES = (
    "torchvision cannot download StanfordCars: the original URL is gone "
    "(https://github.com/pytorch/vision/issues/7545). Get the images from "
    "https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset (flatten cars_train/cars_train "
    "and cars_test/cars_test), the devkit (car_devkit.tgz) and cars_test_annos_withlabels.mat from the "
    "links in that torchvision issue"
)


@dataclass(frozen=True)
class TorchvisionSpec:
    key: str
    title: str  # ZSCL's name of the dataset (its class in collections.py)
    folder: str  # what torchvision's class reads under the root
    layout: str  # what must be inside that folder
    random_split: bool  # ZSCL splits it 80/20 at random (no official test split)
    open: Callable[[str, bool, bool], Any]  # (root, train, download) -> torchvision dataset
    fixed_class_names: tuple[str, ...] | None = None  # ZSCL's own list, else torchvision's


def _train_test(train: bool) -> str:
    return "train" if train else "test"


SPECS: dict[str, TorchvisionSpec] = {
    spec.key: spec
    for spec in (
        TorchvisionSpec(
            "aircraft", "Aircraft", "fgvc-aircraft-2013b",
            "data/images/*.jpg, data/variants.txt, data/images_variant_{train,test}.txt "
            "(fgvc-aircraft-2013b.tar.gz extracted)",
            False, lambda r, t, d: tvd.FGVCAircraft(r, split=_train_test(t), download=d),
        ),
        TorchvisionSpec(
            "caltech101", "Caltech101", "caltech101",
            "101_ObjectCategories/<category>/image_0001.jpg ... (from caltech-101.zip)",
            True, lambda r, t, d: tvd.Caltech101(r, download=d),
            fixed_class_names=zscl_text.CALTECH101_CLASSES,
        ),
        TorchvisionSpec(
            "cifar100", "CIFAR100", "cifar-100-python",
            "train, test, meta (cifar-100-python.tar.gz extracted; the official files: torchvision "
            "checks their MD5 before it unpickles them)",
            False, lambda r, t, d: tvd.CIFAR100(r, train=t, download=d),
        ),
        TorchvisionSpec(
            "dtd", "DTD", "dtd",
            "dtd/images/<class>/*.jpg, dtd/labels/{train1,test1}.txt (dtd-r1.0.1.tar.gz extracted "
            "into dtd/)",
            False, lambda r, t, d: tvd.DTD(r, split=_train_test(t), download=d),
        ),
        TorchvisionSpec(
            "eurosat", "EuroSAT", "eurosat",
            "2750/<class>/*.jpg (the RGB EuroSAT.zip extracted into eurosat/)",
            True, lambda r, t, d: tvd.EuroSAT(r, download=d),
            fixed_class_names=zscl_text.EUROSAT_CLASSES,
        ),
        TorchvisionSpec(
            "flowers", "Flowers", "flowers-102",
            "jpg/image_00001.jpg ..., imagelabels.mat, setid.mat (102flowers.tgz extracted plus the "
            "two official .mat files, whose MD5 torchvision checks)",
            False, lambda r, t, d: tvd.Flowers102(r, split=_train_test(t), download=d),
            fixed_class_names=zscl_text.FLOWERS_CLASSES,
        ),
        TorchvisionSpec(
            "food", "Food", "food-101",
            "images/<class>/*.jpg, meta/{train,test}.json (food-101.tar.gz extracted)",
            False, lambda r, t, d: tvd.Food101(r, split=_train_test(t), download=d),
        ),
        TorchvisionSpec(
            "mnist", "MNIST", "MNIST",
            "raw/{train,t10k}-images-idx3-ubyte and raw/{train,t10k}-labels-idx1-ubyte (the four "
            "official files, un-gzipped)",
            False, lambda r, t, d: tvd.MNIST(r, train=t, download=d),
        ),
        TorchvisionSpec(
            "oxford_pet", "OxfordPet", "oxford-iiit-pet",
            "images/*.jpg, annotations/{trainval,test}.txt (images.tar.gz and annotations.tar.gz "
            "extracted)",
            # ZSCL trains on "trainval" (collections.py, class OxfordPet)
            False, lambda r, t, d: tvd.OxfordIIITPet(r, split="trainval" if t else "test", download=d),
        ),
        TorchvisionSpec(
            "stanford_cars", "StanfordCars", "stanford_cars",
            "cars_train/*.jpg, cars_test/*.jpg, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
            "cars_test_annos_withlabels.mat",
            False, lambda r, t, d: tvd.StanfordCars(r, split=_train_test(t), download=d),
        ),
        TorchvisionSpec(
            "sun397", "SUN397", "SUN397",
            "ClassName.txt and a/abbey/sun_*.jpg ... (SUN397.tar.gz extracted)",
            True, lambda r, t, d: tvd.SUN397(r, download=d),
        ),
    )
}


def spec_for(key: str) -> TorchvisionSpec:
    if key not in SPECS:
        raise ValueError(f"unknown MTIL dataset '{key}'; choose from {sorted(SPECS)}")
    return SPECS[key]


def missing_message(spec: TorchvisionSpec, root: str | Path) -> str:
    folder = Path(root) / spec.folder
    how = (
        STANFORD_CARS_SOURCES
        if spec.key == "stanford_cars"
        else "or set download: true to let torchvision fetch it (needs internet)"
    )
    return (
        f"dataset '{spec.key}' ({spec.title}) not found or not readable at {folder}: put {spec.layout} "
        f"there, {how}."
    )


def open_torchvision(key: str, root: str | Path, train: bool, download: bool = False) -> Any:
    """torchvision's dataset object for ``key``; for random-split datasets, the whole set."""
    spec = spec_for(key)
    root = str(root)
    if not (Path(root) / spec.folder).exists() and (not download or spec.key == "stanford_cars"):
        # Checked first: some torchvision classes create folders before they look for files.
        raise DataFormatError(missing_message(spec, root))
    try:
        return spec.open(root, train, download)
    except (OSError, RuntimeError, ValueError) as error:  # offline, corrupted, wrong checksum
        raise DataFormatError(f"{missing_message(spec, root)} torchvision said: {error}") from error


def labels_of(dataset: Any) -> np.ndarray:
    """Every label of a torchvision dataset, read from its annotation tables, not its images."""
    for attribute in ("targets", "_labels", "y"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return np.asarray(values, dtype=np.int64)
    samples = getattr(dataset, "_samples", None)  # StanfordCars: (path, label) pairs
    if samples is not None:
        return np.asarray([label for _, label in samples], dtype=np.int64)
    logger.warning("%s keeps no label table; reading every item for its label", type(dataset).__name__)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


def base_order(key: str, dataset: Any) -> np.ndarray:
    """The order the random split is drawn over. torchvision lists SUN397's files with ``rglob``,
    whose order depends on the file system; sorting by path makes the split the same everywhere
    (ZSCL split whatever order its machine listed)."""
    files = getattr(dataset, "_image_files", None)
    if key == "sun397" and files is not None:
        return np.argsort(np.asarray([str(path) for path in files]), kind="stable")
    return np.arange(len(dataset))


def zscl_random_split(count: int, train_fraction: float = RANDOM_SPLIT_TRAIN_FRACTION,
                      seed: int = RANDOM_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and test parts, drawn exactly as ZSCL does: ``random_split`` with
    ``int(0.8 * n)`` train examples and a generator seeded with 42
    (ZSCL mtil/src/datasets/collections.py, ClassificationDataset.split_dataset)."""
    train_size = int(train_fraction * count)
    train, test = torch.utils.data.random_split(
        range(count), [train_size, count - train_size], generator=torch.Generator().manual_seed(seed)
    )
    return np.asarray(train.indices, dtype=np.int64), np.asarray(test.indices, dtype=np.int64)


def class_names_for(spec: TorchvisionSpec, dataset: Any) -> tuple[str, ...]:
    """ZSCL's list where it writes one; else torchvision's names with "_" -> " "
    (ZSCL mtil/src/datasets/collections.py, ClassificationDataset.process_labels)."""
    found = list(getattr(dataset, "classes", None) or getattr(dataset, "categories"))
    if spec.fixed_class_names is None:
        return tuple(name.replace("_", " ") for name in found)
    if len(found) != len(spec.fixed_class_names):
        raise DataFormatError(
            f"dataset '{spec.key}': torchvision found {len(found)} classes, ZSCL's class list has "
            f"{len(spec.fixed_class_names)}; the folder does not hold the official release"
        )
    return spec.fixed_class_names


def split_positions(key: str, dataset: Any, split: str) -> np.ndarray:
    """Indices into ``dataset`` of ``split``: all of it for an official split, else ZSCL's 80/20."""
    if not spec_for(key).random_split:
        return np.arange(len(dataset))
    order = base_order(key, dataset)
    train, test = zscl_random_split(len(order))
    return order[train if split == "train" else test]


def load_split(key: str, root: str | Path, split: str, download: bool = False) -> SubsetSource:
    """The ``split`` ("train" or "test") of MTIL dataset ``key`` as an image source, with ZSCL's
    class names and templates."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    spec = spec_for(key)
    dataset = open_torchvision(key, root, train=split == "train", download=download)
    return SubsetSource(
        name=f"{key}_{split}",
        dataset=dataset,
        indices=split_positions(key, dataset, split),
        all_labels=labels_of(dataset),
        class_names=class_names_for(spec, dataset),
        templates=zscl_text.TEMPLATES[key],
    )
