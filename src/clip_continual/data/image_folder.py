"""Image-folder datasets (one folder per class), read in torchvision ``ImageFolder`` order.

Classes are the sorted folder names and, within a class, files are sorted by name (torchvision's
``find_classes`` / ``make_dataset``, the order the paper's ``ImageFolder`` loaders see, CL-CLIP
``data.py``). An optional class map renames folders (``n01440764`` -> ``tench``): a JSON object
or a ``folder,name`` CSV that must cover every folder used. The zero-shot prompt is the paper's
``this is a photo of {label} .`` (CL-CLIP ``data.py``, ``ZSTask``).

Expected layout::

    my_zero_shot_set/
        <class folder>/<image>.jpg ...      (any of torchvision's image extensions)
    class_map.json | class_map.csv          (optional)

Plain Python; no Kedro import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from clip_continual.data.index import ImageIndex
from clip_continual.data.raw_files import (
    EmptyDataError, MissingInputError, RawFormatError, read_class_map, require_folder,
)

ZERO_SHOT_PROMPT = "this is a photo of {label} ."
_FIX_FOLDER = "Put one folder per class there, each holding that class's images."


def class_folders(root: str | Path) -> list[str]:
    """The class folder names under ``root``, sorted (hidden folders skipped)."""
    root = require_folder(root, "image folder dataset", _FIX_FOLDER)
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise EmptyDataError(f"image folder dataset: '{root}' has no class folder. {_FIX_FOLDER}")
    return folders


def _class_names(folders: Sequence[str], class_map: str | Path | dict[str, str] | None) -> tuple[str, ...]:
    if class_map is None:
        return tuple(folders)
    mapping = class_map if isinstance(class_map, dict) else read_class_map(class_map)
    uncovered = [folder for folder in folders if not mapping.get(folder)]
    if uncovered:
        source = "the class map" if isinstance(class_map, dict) else f"class map '{class_map}'"
        raise RawFormatError(
            f"{source} names no class for {len(uncovered)} of the {len(folders)} folders, e.g. "
            f"{uncovered[:5]}. Add a 'folder -> class name' entry for each of them, or remove "
            "those folders."
        )
    return tuple(mapping[folder] for folder in folders)


def _samples(root: Path, folders: Sequence[str]) -> list[tuple[str, int]]:
    samples = make_dataset(str(root), {folder: index for index, folder in enumerate(folders)},
                           extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(folders))
    empty = [folder for folder, count in zip(folders, counts) if count == 0]
    if empty:
        raise EmptyDataError(
            f"image folder dataset: {len(empty)} class folders under '{root}' hold no image "
            f"({', '.join(IMG_EXTENSIONS)}), e.g. {empty[:5]}. Add the images or remove those folders."
        )
    return samples


def image_folder_index(
    root: str | Path, class_map: str | Path | dict[str, str] | None = None, *,
    folders: Sequence[str] | None = None, name: str = "", missing_fix: str = _FIX_FOLDER,
) -> ImageIndex:
    """An image-folder dataset as an index; ``folders`` restricts it to those class folders
    (in sorted order), which must all exist (else the error ends with ``missing_fix``); class
    names come from ``class_map`` if given, else the folder names."""
    root = require_folder(root, "image folder dataset", _FIX_FOLDER)
    present = class_folders(root)
    if folders is None:
        folders = present
    else:
        missing = sorted(set(folders) - set(present))
        if missing:
            raise MissingInputError(
                f"image folder dataset: {len(missing)} of the {len(set(folders))} class folders "
                f"expected under '{root}' are missing, e.g. {missing[:5]}. {missing_fix}"
            )
        folders = sorted(set(folders))
    class_names = _class_names(folders, class_map)
    samples = _samples(root, folders)
    return ImageIndex(
        root=str(root), paths=tuple(str(Path(path).relative_to(root)) for path, _ in samples),
        labels=np.array([label for _, label in samples], dtype=np.int64),
        class_names=class_names, name=name or root.name,
    )
