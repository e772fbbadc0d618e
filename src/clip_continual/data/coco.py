"""COCO 2014 object crops, the paper's updated task (OST: 80 classes at once; MST: 8 x 10).

Facts from the paper's code (CL-CLIP ``data_preprocess/coco_process.py`` and ``data.py``):
- one crop per box ``(x, y, w, h)`` of the instances files whose width and height both exceed 4 px
  (here also inside the image: a box beyond the image's border is left out and counted);
- train crops: every such box of ``instances_train2014.json``, cut from ``train2014/`` images;
- val / test crops: the boxes of ``instances_val2014.json`` on the images that Karpathy's
  ``dataset_coco.json`` puts in its ``val`` / ``test`` split (restval images are in neither);
- classes: the 80 categories in category-id order (the file lists them by id; we sort to be sure),
  so MST phase p holds the classes with index // 10 == p;
- class prompt ``this is a photo of {name} in the scene .``.

Expected layout (file names as COCO ships them)::

    coco2014/
        annotations/instances_train2014.json
        annotations/instances_val2014.json
        train2014/COCO_train2014_000000000009.jpg ...
        val2014/COCO_val2014_000000000042.jpg ...
        dataset_coco.json                    (Karpathy's split file)

Plain Python; no Kedro import.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from clip_continual.data.images import check_images_present
from clip_continual.data.index import ImageIndex
from clip_continual.data.karpathy import read_karpathy, select_split
from clip_continual.data.raw_files import (
    EmptyDataError, RawFormatError, read_json, require_file, require_folder, require_keys,
)

logger = logging.getLogger(__name__)

COCO_PROMPT = "this is a photo of {name} in the scene ."
MIN_BOX_SIDE = 4.0  # a box is kept when width > 4 and height > 4 (pixels)
COCO_SPLITS = ("train", "val", "test")
_INSTANCE_KEYS = ("images", "annotations", "categories")
_FIX_INSTANCES = ("Use the unmodified instances file from COCO's annotations_trainval2014.zip "
                  "(the instances_*.json files, not captions_* or person_keypoints_*).")
_FIX_ROOT = ("Unpack train2014.zip, val2014.zip and annotations_trainval2014.zip there (see the "
             "README for the folder tree), or set the COCO folder parameter.")


def load_instances(path: str | Path) -> dict:
    """A COCO instances file, checked to hold its images, annotations and categories."""
    document = read_json(path, "COCO instances file", _FIX_INSTANCES)
    require_keys(document, _INSTANCE_KEYS, path, "COCO instances file", _FIX_INSTANCES)
    if not document["categories"]:
        raise EmptyDataError(f"COCO instances file: '{path}' lists no categories. {_FIX_INSTANCES}")
    return document


def coco_categories(instances: dict) -> tuple[list[int], tuple[str, ...]]:
    """Category ids and names in id order (class index i is the i-th smallest id)."""
    categories = sorted(instances["categories"], key=lambda category: int(category["id"]))
    return [int(c["id"]) for c in categories], tuple(str(c["name"]) for c in categories)


def _check_same_categories(train: dict, val: dict, train_path: Path, val_path: Path) -> None:
    if coco_categories(train) != coco_categories(val):
        raise RawFormatError(
            f"COCO instances files: '{train_path}' and '{val_path}' list different categories; "
            f"both must come from the same COCO release. {_FIX_INSTANCES}"
        )


def _image_table(instances: dict, path: Path) -> dict[int, tuple[str, float, float]]:
    """image id -> (file name, width, height); a repeated id is refused (its boxes would be
    silently given to whichever image came last)."""
    table: dict[int, tuple[str, float, float]] = {}
    repeated = []
    for image in instances["images"]:
        try:
            entry = (str(image["file_name"]), float(image.get("width", "inf")), float(image.get("height", "inf")))
            image_id = image["id"]
        except (KeyError, TypeError, ValueError) as error:
            raise RawFormatError(f"COCO instances file: an image entry in '{path}' lacks a valid id, "
                                 f"file_name, width or height ({error!r}). {_FIX_INSTANCES}") from error
        if image_id in table:
            repeated.append(image_id)
        table[image_id] = entry
    if repeated:
        raise RawFormatError(
            f"COCO instances file: '{path}' lists {len(repeated)} image ids more than once, e.g. "
            f"{repeated[:5]}; each id must name one image. {_FIX_INSTANCES}"
        )
    return table


def inside_image(box: tuple[float, float, float, float], width: float, height: float) -> tuple[float, float]:
    """The width and height of the part of ``box`` (x, y, w, h) inside a width x height image."""
    x, y, w, h = box
    return min(x + w, width) - max(x, 0.0), min(y + h, height) - max(y, 0.0)


def _boxes_of(instances: dict, path: Path, keep_files: set[str] | None, dropped: Counter):
    """(file name, box, category id) of every box > 4 px on the kept images, in file order.
    Boxes of kept images whose part inside the image is 4 px or less on a side (beyond the
    image, or cut down to a sliver by its border) would be black crops: counted in ``dropped``."""
    images = _image_table(instances, path)
    for annotation in instances["annotations"]:
        try:
            x, y, width, height = (float(v) for v in annotation["bbox"])
            file_name, image_width, image_height = images[annotation["image_id"]]
            category = int(annotation["category_id"])
        except (KeyError, TypeError, ValueError) as error:
            raise RawFormatError(
                f"COCO instances file: annotation {annotation.get('id', '?')} in '{path}' has no "
                f"valid bbox [x, y, w, h], image_id and category_id ({error!r}). {_FIX_INSTANCES}"
            ) from error
        if not (width > MIN_BOX_SIDE and height > MIN_BOX_SIDE) or (keep_files is not None and file_name not in keep_files):
            continue
        if min(inside_image((x, y, width, height), image_width, image_height)) <= MIN_BOX_SIDE:
            dropped["outside the image"] += 1
            continue
        yield file_name, (x, y, width, height), category


def _crop_index(instances: dict, path: Path, root: Path, folder: str, split: str,
                keep_files: set[str] | None) -> ImageIndex:
    ids, names = coco_categories(instances)
    label_of = {cid: index for index, cid in enumerate(ids)}
    dropped: Counter = Counter()
    crops = list(_boxes_of(instances, path, keep_files, dropped))
    if dropped:
        logger.warning("COCO %s: %d boxes lie (almost) outside their image and are left out",
                       split, sum(dropped.values()))
    unknown = next((c for _, _, c in crops if c not in label_of), None)
    if unknown is not None:
        raise RawFormatError(f"COCO instances file: '{path}' annotates category {unknown}, which its "
                             f"'categories' list lacks. {_FIX_INSTANCES}")
    if not crops:
        raise EmptyDataError(
            f"COCO crops: split '{split}' is empty: no box wider and taller than {MIN_BOX_SIDE:g} px "
            f"in '{path}'" + ("" if keep_files is None else f" on the {len(keep_files)} images of "
                              "Karpathy's split (is dataset_coco.json the COCO 2014 file?)") + "."
        )
    index = ImageIndex(
        root=str(root), paths=tuple(f"{folder}/{file_name}" for file_name, _, _ in crops),
        labels=np.array([label_of[c] for _, _, c in crops], dtype=np.int64), class_names=names,
        boxes=np.array([box for _, box, _ in crops], dtype=np.float64), name=f"coco_crops_{split}",
        dropped_boxes=sum(dropped.values()),
    )
    check_images_present(index, f"COCO {folder} images", _FIX_ROOT)
    return index


def _check_layout(root: Path, splits: tuple[str, ...], karpathy_json: Path) -> dict[str, Path]:
    """Every file and folder the asked splits need, checked before any (slow) JSON is parsed."""
    require_folder(root, "COCO 2014 folder", _FIX_ROOT)
    require_folder(root / "annotations", "COCO 2014 annotations", _FIX_ROOT)
    folders = ["train2014"] * ("train" in splits) + ["val2014"] * any(s != "train" for s in splits)
    paths = {}
    for folder in folders:
        paths[folder] = require_file(root / "annotations" / f"instances_{folder}.json",
                                     "COCO instances file", _FIX_ROOT)
        require_folder(root / folder, f"COCO {folder} images", _FIX_ROOT)
    if "val2014" in folders:
        require_file(karpathy_json, "Karpathy caption file",
                     "Get dataset_coco.json from Karpathy's caption_datasets.zip, or set its parameter.")
    return paths


def coco_crops(
    coco_root: str | Path, karpathy_json: str | Path | None = None,
    splits: tuple[str, ...] = COCO_SPLITS,
) -> dict[str, ImageIndex]:
    """The COCO 2014 crop splits named in ``splits`` (train, val, test) as image indices.

    Paths are relative to ``coco_root``; ``karpathy_json`` defaults to
    ``coco_root/dataset_coco.json`` (read only when val or test is asked for).
    """
    if not splits or set(splits) - set(COCO_SPLITS):
        raise ValueError(f"COCO crop splits must be among {COCO_SPLITS}, got {list(splits)}")
    root = Path(coco_root)
    karpathy_json = Path(karpathy_json or root / "dataset_coco.json")
    paths = _check_layout(root, tuple(splits), karpathy_json)
    instances = {folder: load_instances(path) for folder, path in paths.items()}
    if len(instances) == 2:
        _check_same_categories(instances["train2014"], instances["val2014"], *paths.values())
    result = {}
    if "train" in splits:
        result["train"] = _crop_index(instances["train2014"], paths["train2014"], root, "train2014", "train", None)
    if "val2014" in instances:
        entries = read_karpathy(karpathy_json)
        for split in (s for s in splits if s != "train"):
            files = {str(entry["filename"]) for entry in select_split(entries, split, karpathy_json)}
            result[split] = _crop_index(instances["val2014"], paths["val2014"], root, "val2014", split, files)
    return {split: result[split] for split in splits}


def coco_class_names(coco_root: str | Path) -> tuple[str, ...]:
    """The 80 class names in id order, from ``instances_val2014.json`` (the smaller file)."""
    path = Path(coco_root) / "annotations" / "instances_val2014.json"
    return coco_categories(load_instances(path))[1]
