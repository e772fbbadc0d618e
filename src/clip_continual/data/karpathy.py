"""Karpathy's caption splits (``dataset_coco.json``, ``dataset_flickr30k.json``) and the
retrieval test sets built from them: COCO 5K test and Flickr30K 1K test, five captions per image.

A Karpathy file is ``{"images": [{"filename", "split", "sentences": [{"raw", ...}, ...],
"filepath" (COCO only), ...}, ...], "dataset": ...}`` with splits train / restval / val / test.
Images keep the file's order, so consecutive blocks of 1,000 COCO test images are the standard
1K folds: evaluate COCO with ``COCO_RETRIEVAL_FOLDS`` folds (the mean of five 1K folds, as the
paper reports) and Flickr30K with one. Plain Python; no Kedro import.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from clip_continual.data.images import check_images_present
from clip_continual.data.index import ImageIndex
from clip_continual.data.raw_files import EmptyDataError, RawFormatError, read_json, require_folder, require_keys

KARPATHY_SPLITS = ("train", "restval", "val", "test")
CAPTIONS_PER_IMAGE = 5
COCO_RETRIEVAL_FOLDS = 5  # 5K test reported as the mean of five 1K folds
FLICKR_RETRIEVAL_FOLDS = 1  # Flickr30K 1K test as one gallery

PUBLISHED_TEST_SIZES = {"coco_5k_test": 5000, "flickr30k_1k_test": 1000}
log = logging.getLogger(__name__)

_FIX = ("Use Karpathy's split file (dataset_coco.json / dataset_flickr30k.json from "
        "caption_datasets.zip), unchanged.")


def read_karpathy(karpathy_json: str | Path) -> list[dict]:
    """All entries of a Karpathy file, in file order (read once: the COCO file is large)."""
    document = read_json(karpathy_json, "Karpathy caption file", _FIX)
    require_keys(document, ("images",), karpathy_json, "Karpathy caption file", _FIX)
    entries = document["images"]
    bad = next((e for e in entries if not isinstance(e, dict) or not {"filename", "split"} <= set(e)), None)
    if bad is not None:
        raise RawFormatError(
            f"Karpathy caption file: an entry of 'images' in '{karpathy_json}' lacks 'filename' or "
            f"'split': {str(bad)[:200]}. {_FIX}"
        )
    return entries


def select_split(entries: list[dict], split: str, karpathy_json: str | Path) -> list[dict]:
    """The entries of ``split``, in file order; raises naming the file if there are none."""
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"Karpathy split must be one of {KARPATHY_SPLITS}, got '{split}'")
    chosen = [entry for entry in entries if entry["split"] == split]
    if not chosen:
        found = sorted({str(entry["split"]) for entry in entries})
        raise EmptyDataError(
            f"Karpathy caption file: '{karpathy_json}' has no image in split '{split}' (found the "
            f"splits {found}). {_FIX}"
        )
    return chosen


def karpathy_path(entry: dict) -> str:
    """An entry's image path relative to the dataset root (COCO entries carry their folder)."""
    folder = entry.get("filepath")
    return f"{folder}/{entry['filename']}" if folder else str(entry["filename"])


def _first_captions(entry: dict, karpathy_json: Path, count: int) -> tuple[str, ...]:
    sentences = entry.get("sentences") or []
    captions = [str(s.get("raw", "")).strip() for s in sentences if isinstance(s, dict)]
    captions = [caption for caption in captions if caption]
    if len(captions) < count:
        raise RawFormatError(
            f"Karpathy caption file: image '{karpathy_path(entry)}' in '{karpathy_json}' has "
            f"{len(captions)} captions with a 'raw' text, expected at least {count}. {_FIX}"
        )
    return tuple(captions[:count])  # a few COCO images have six or seven: the first five count


def retrieval_index(
    karpathy_json: str | Path, image_root: str | Path, split: str = "test", *,
    captions_per_image: int = CAPTIONS_PER_IMAGE, name: str = "",
) -> ImageIndex:
    """The images of ``split`` (paths relative to ``image_root``) with their first
    ``captions_per_image`` captions; labels are -1 (a retrieval gallery has no classes)."""
    karpathy_json = Path(karpathy_json)
    fix = "Point the image folder parameter at the folder the file's image names live in."
    image_root = require_folder(image_root, f"images of '{karpathy_json.name}'", fix)
    entries = select_split(read_karpathy(karpathy_json), split, karpathy_json)
    index = ImageIndex(
        root=str(image_root),
        paths=tuple(karpathy_path(entry) for entry in entries),
        labels=np.full(len(entries), -1, dtype=np.int64),
        class_names=(),
        captions=tuple(_first_captions(entry, karpathy_json, captions_per_image) for entry in entries),
        name=name or f"{karpathy_json.stem}_{split}",
    )
    check_images_present(index, f"images of '{karpathy_json.name}'", fix)
    return index


def _published(index: ImageIndex) -> ImageIndex:
    expected = PUBLISHED_TEST_SIZES[index.name]
    if len(index) != expected:
        log.warning("%s has %d images, not the published %d: its recalls are not comparable with "
                    "published ones", index.name, len(index), expected)
    return index


def coco_retrieval(coco_root: str | Path, karpathy_json: str | Path | None = None) -> ImageIndex:
    """COCO 5K test (Karpathy split 'test'): images under ``coco_root/val2014``.

    ``karpathy_json`` defaults to ``coco_root/dataset_coco.json``."""
    coco_root = Path(coco_root)
    return _published(retrieval_index(karpathy_json or coco_root / "dataset_coco.json", coco_root, "test",
                                      name="coco_5k_test"))


def flickr30k_retrieval(
    flickr_root: str | Path, karpathy_json: str | Path | None = None, images_dir: str | Path | None = None,
) -> ImageIndex:
    """Flickr30K 1K test (Karpathy split 'test').

    Defaults: ``flickr_root/dataset_flickr30k.json`` and images in ``flickr_root/flickr30k-images``."""
    flickr_root = Path(flickr_root)
    return _published(retrieval_index(
        karpathy_json or flickr_root / "dataset_flickr30k.json",
        images_dir or flickr_root / "flickr30k-images", "test", name="flickr30k_1k_test",
    ))
