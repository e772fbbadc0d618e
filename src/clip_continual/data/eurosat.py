"""EuroSAT (RGB), the satellite task of the paper's later revision (MST: 5 phases x 2 classes).

Facts from the paper's code (CL-CLIP ``data.py``, class ``EuroSAT``): the images are read as an
``ImageFolder`` (classes = sorted folder names, files sorted by name within a class); the last 500
images of each class are the test set and the rest train; class names split the folder's
CamelCase into lower-case words (``HerbaceousVegetation`` -> ``herbaceous vegetation``); MST phase
p holds classes 2p and 2p+1; prompt ``this is a satellite photo of {name} .``. File names are
sorted as text, as ``ImageFolder`` does (``River_10.jpg`` comes before ``River_2.jpg``).

Expected layout (EuroSAT.zip unpacks to ``2750/``, newer archives to ``EuroSAT_RGB/``)::

    eurosat/2750/
        AnnualCrop/AnnualCrop_1.jpg ...   (10 class folders, 2,000-3,000 images each)
        Forest/ HerbaceousVegetation/ Highway/ Industrial/ Pasture/ PermanentCrop/
        Residential/ River/ SeaLake/

Plain Python; no Kedro import.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from clip_continual.data.image_folder import class_folders, image_folder_index
from clip_continual.data.index import ImageIndex
from clip_continual.data.raw_files import EmptyDataError, MissingInputError, require_folder

EUROSAT_PROMPT = "this is a satellite photo of {name} ."
EUROSAT_FOLDERS = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)
TEST_PER_CLASS = 500
_FIX = ("Point the EuroSAT parameter at the folder that holds the 10 class folders (2750/ from "
        "EuroSAT.zip, or EuroSAT_RGB/).")


def eurosat_class_name(folder: str) -> str:
    """``HerbaceousVegetation`` -> ``herbaceous vegetation`` (the paper's class names)."""
    return " ".join(re.findall("[A-Z][^A-Z]*", folder)).lower()


def _check_layout(root: Path) -> None:
    present = class_folders(root)
    missing = [folder for folder in EUROSAT_FOLDERS if folder not in present]
    if missing:
        hint = f" It holds {present[:5]}: is the data one level further down?" if len(present) < 3 else ""
        raise MissingInputError(
            f"EuroSAT: '{root}' lacks the class folders {missing}.{hint} {_FIX}"
        )


def eurosat_splits(root: str | Path, test_per_class: int = TEST_PER_CLASS) -> dict[str, ImageIndex]:
    """``{"train", "test"}``: per class, the last ``test_per_class`` files by name are test."""
    root = require_folder(root, "EuroSAT folder", _FIX)
    _check_layout(root)
    index = image_folder_index(root, {f: eurosat_class_name(f) for f in EUROSAT_FOLDERS},
                               folders=EUROSAT_FOLDERS, name="eurosat")
    train, test = [], []
    for label, folder in enumerate(EUROSAT_FOLDERS):
        members = np.flatnonzero(index.labels == label)  # already in file-name order
        if len(members) <= test_per_class:
            raise EmptyDataError(
                f"EuroSAT: '{root / folder}' holds {len(members)} images, so the last "
                f"{test_per_class} leave no training image. Restore the full class folder."
            )
        train.append(members[:-test_per_class])
        test.append(members[-test_per_class:])
    return {
        "train": replace(index.subset(np.concatenate(train)), name="eurosat_train"),
        "test": replace(index.subset(np.concatenate(test)), name="eurosat_test"),
    }

