"""Writers of the eleven MTIL datasets (and CIFAR-100) in miniature, for tests (plain functions).

Each writer puts under a root the exact layout torchvision's dataset class reads, with a few tiny
real images per class, and returns what a correct reader must find (class folder names, the
number of train and test images). ``write_mtil_raw`` writes all eleven side by side, as a user's
``data/01_raw`` holds them.

What these fixtures cannot cover: torchvision checks the MD5 of CIFAR-100's three pickles and of
Flowers' two .mat files against the official release, which no file written here can match. The
tests show that this check rejects the fixtures (so it stays in force for users), then bypass
only that comparison to test everything under it. Real image content, sizes and class balance
are not reproduced; Caltech101, EuroSAT and Flowers carry their real number of classes because
ZSCL's class lists must line up with them, the others three to five classes.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from realdata_fixtures import EUROSAT_FOLDERS

IMAGE_SIZE = 12


@dataclass(frozen=True)
class WrittenSet:
    folder: Path
    class_folders: tuple[str, ...]  # the raw names in the files, in label order
    train_count: int  # images in the official train split (all images where there is none)
    test_count: int  # images in the official test split (0 where there is none)


def class_image(label: int, index: int, size: int = IMAGE_SIZE, mode: str = "RGB") -> Image.Image:
    """A small image whose colour tells its class, with a little noise so no two are equal."""
    rng = np.random.default_rng([label, index])
    base = np.array([(37 * label) % 256, (91 * label) % 256, (53 * label + 128) % 256])
    pixels = np.clip(base + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


# --- file-per-image datasets with split files --------------------------------------------------

AIRCRAFT_VARIANTS = ("707-320", "A300B4", "BAE 146-200", "Cessna 172")


def write_aircraft(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in AIRCRAFT_VARIANTS))
    image_id = 1000000
    for split, count in zip(("train", "test"), per_class):
        lines = []
        for label, variant in enumerate(AIRCRAFT_VARIANTS):
            for k in range(count):
                image_id += 1
                _save(class_image(label, image_id), data / "images" / f"{image_id:07d}.jpg")
                lines.append(f"{image_id:07d} {variant}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    n = len(AIRCRAFT_VARIANTS)
    return WrittenSet(root / "fgvc-aircraft-2013b", AIRCRAFT_VARIANTS, n * per_class[0], n * per_class[1])


DTD_CLASSES = ("banded", "blotchy", "crystalline", "zigzagged")


def write_dtd(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True, exist_ok=True)
    start = 1
    for split, count in zip(("train", "test"), per_class):
        lines = []
        for label, name in enumerate(DTD_CLASSES):
            for k in range(start, start + count):
                _save(class_image(label, k), data / "images" / name / f"{name}_{k:04d}.jpg")
                lines.append(f"{name}/{name}_{k:04d}.jpg\n")
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
        start += count
    n = len(DTD_CLASSES)
    return WrittenSet(root / "dtd", DTD_CLASSES, n * per_class[0], n * per_class[1])


FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "caesar_salad")


def write_food(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True, exist_ok=True)
    image_id = 100
    for split, count in zip(("train", "test"), per_class):
        meta = {}
        for label, name in enumerate(FOOD_CLASSES):
            meta[name] = []
            for _ in range(count):
                image_id += 1
                _save(class_image(label, image_id), base / "images" / name / f"{image_id}.jpg")
                meta[name].append(f"{name}/{image_id}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    n = len(FOOD_CLASSES)
    return WrittenSet(base, FOOD_CLASSES, n * per_class[0], n * per_class[1])


PET_BREEDS = ("Abyssinian", "american_bulldog", "german_shorthaired")


def write_oxford_pet(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    number = 0
    for split, count in zip(("trainval", "test"), per_class):
        lines = []
        for label, breed in enumerate(PET_BREEDS):
            for _ in range(count):
                number += 1
                _save(class_image(label, number), base / "images" / f"{breed}_{number}.jpg")
                species = 1 if breed[0].isupper() else 2  # cat images are capitalised
                lines.append(f"{breed}_{number} {label + 1} {species} 1\n")
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    n = len(PET_BREEDS)
    return WrittenSet(base, PET_BREEDS, n * per_class[0], n * per_class[1])


# --- .mat-annotated datasets -----------------------------------------------------------------

CAR_CLASSES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012")


def _car_annotations(names: list[str], labels: list[int]) -> dict:
    records = np.zeros((1, len(names)), dtype=[("fname", object), ("class", object)])
    for i, (name, label) in enumerate(zip(names, labels)):
        records[0, i] = (name, np.array([[label + 1]], dtype=np.uint8))
    return {"annotations": records}


def write_stanford_cars(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array([list(CAR_CLASSES)], dtype=object)})
    targets = {"train": base / "devkit" / "cars_train_annos.mat",
               "test": base / "cars_test_annos_withlabels.mat"}
    for split, count in zip(("train", "test"), per_class):
        names, labels = [], []
        for label in range(len(CAR_CLASSES)):
            for k in range(count):
                names.append(f"{len(names) + 1:05d}.jpg")
                labels.append(label)
                _save(class_image(label, len(names)), base / f"cars_{split}" / names[-1])
        scipy.io.savemat(targets[split], _car_annotations(names, labels))
    n = len(CAR_CLASSES)
    return WrittenSet(base, CAR_CLASSES, n * per_class[0], n * per_class[1])


def write_flowers(root: Path, per_class: tuple[int, int] = (1, 1), classes: int = 102) -> WrittenSet:
    """102 classes (ZSCL's name list must line up); labels 1-based as in imagelabels.mat."""
    base = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for split, count in zip(("trnid", "tstid"), per_class):
        for label in range(classes):
            for _ in range(count):
                labels.append(label + 1)
                ids[split].append(len(labels))
                _save(class_image(label, len(labels)), base / "jpg" / f"image_{len(labels):05d}.jpg")
    ids["valid"].append(ids["trnid"][0])  # torchvision reads valid too; never used here
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    folders = tuple(str(i) for i in range(1, classes + 1))
    return WrittenSet(base, folders, classes * per_class[0], classes * per_class[1])


# --- folder-per-class datasets without an official split ---------------------------------------

# Caltech-101's category folders, sorted as torchvision sorts them (capitals first).
CALTECH101_FOLDERS = tuple(sorted("""
Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver binocular
bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair
chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill
dolphin dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield
gerenuk gramophone grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree
kangaroo ketch lamp laptop llama lobster lotus mandolin mayfly menorah metronome minaret nautilus
octopus okapi pagoda panda pigeon pizza platypus pyramid revolver rhino rooster saxophone schooner
scissors scorpion sea_horse snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry
sunflower tick trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair wrench yin_yang
""".split()))


def write_caltech101(root: Path, per_class: int = 2) -> WrittenSet:
    categories = root / "caltech101" / "101_ObjectCategories"
    _save(class_image(999, 1), categories / "BACKGROUND_Google" / "image_0001.jpg")
    for label, name in enumerate(CALTECH101_FOLDERS):
        for k in range(1, per_class + 1):
            _save(class_image(label, k, mode="L" if label % 2 else "RGB"), categories / name / f"image_{k:04d}.jpg")
    return WrittenSet(root / "caltech101", CALTECH101_FOLDERS, len(CALTECH101_FOLDERS) * per_class, 0)


def write_eurosat(root: Path, per_class: int = 3) -> WrittenSet:
    for label, name in enumerate(EUROSAT_FOLDERS):
        for k in range(1, per_class + 1):
            _save(class_image(label, k), root / "eurosat" / "2750" / name / f"{name}_{k}.jpg")
    return WrittenSet(root / "eurosat", EUROSAT_FOLDERS, len(EUROSAT_FOLDERS) * per_class, 0)


SUN397_CLASSES = ("/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop", "/b/bamboo_forest")


def write_sun397(root: Path, per_class: int = 3) -> WrittenSet:
    base = root / "SUN397"
    base.mkdir(parents=True, exist_ok=True)
    (base / "ClassName.txt").write_text("".join(f"{c}\n" for c in SUN397_CLASSES))
    for label, name in enumerate(SUN397_CLASSES):
        for k in range(per_class):
            _save(class_image(label, k), base / name.strip("/") / f"sun_{label:02d}{k:04d}.jpg")
    folders = tuple(c[3:] for c in SUN397_CLASSES)
    return WrittenSet(base, folders, len(SUN397_CLASSES) * per_class, 0)


# --- array datasets ----------------------------------------------------------------------------

def _idx_file(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0, 0, uint8 = 0x08, ndim), big-endian sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    raw = root / "MNIST" / "raw"
    for prefix, count in zip(("train", "t10k"), per_class):
        labels = np.repeat(np.arange(10), count)
        images = np.stack([np.asarray(class_image(int(y), i, size=28, mode="L")) for i, y in enumerate(labels)])
        _idx_file(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx_file(raw / f"{prefix}-labels-idx1-ubyte", labels)
    digits = tuple(str(i) for i in range(10))
    return WrittenSet(root / "MNIST", digits, 10 * per_class[0], 10 * per_class[1])


CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm
""".split())


def _cifar_batch(labels: np.ndarray) -> dict:
    images = np.stack([np.asarray(class_image(int(y), i, size=32)) for i, y in enumerate(labels)])
    return {"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
            "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}


def write_cifar100(root: Path, per_class: tuple[int, int] = (2, 1)) -> WrittenSet:
    """The pickles of cifar-100-python (train, test, meta), with the real class names."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "test"), per_class):
        with open(base / split, "wb") as f:
            pickle.dump(_cifar_batch(np.repeat(np.arange(100), count)), f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": []}, f)
    return WrittenSet(base, CIFAR100_CLASSES, 100 * per_class[0], 100 * per_class[1])


WRITERS = {
    "aircraft": write_aircraft, "caltech101": write_caltech101, "cifar100": write_cifar100,
    "dtd": write_dtd, "eurosat": write_eurosat, "flowers": write_flowers, "food": write_food,
    "mnist": write_mnist, "oxford_pet": write_oxford_pet, "stanford_cars": write_stanford_cars,
    "sun397": write_sun397,
}


def write_mtil_raw(root: Path) -> dict[str, WrittenSet]:
    """All eleven datasets under ``root``, each in the folder its torchvision class reads."""
    return {key: writer(root) for key, writer in WRITERS.items()}


def accept_unofficial_checksums(monkeypatch) -> None:
    """Let torchvision read the fixture's CIFAR-100 pickles and Flowers .mat files: their MD5
    cannot match the official release, so only that comparison is replaced, by a test that the
    file exists. Everything else torchvision does with the files still runs."""
    import os

    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers102

    def exists(path, md5=None):
        return os.path.isfile(path)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(flowers102, "check_integrity", exists)
