"""Reference sets of the named benchmarks: the image-caption data that A-GEM and GEM replay and
ZSCL distils on, read from the files a user gives by path in ``<benchmark>.reference``.

What the published code uses:

- A-GEM / GEM (CL-CLIP ``main.py --replay_data``, ``data.py`` ``Replayed``): image-caption
  *pairs*, a LAION subset as img2dataset writes it: ``<key>.jpg`` beside ``<key>.json`` holding
  ``{"key": ..., "caption": ...}``, in any sub-folder.
- ZSCL on MTIL (``mtil/scripts/ZSCL.sh --ref-dataset ImageNet --ref-sentences
  conceptual_captions``; ``mtil/src/models/finetune.py``): *images* from ImageNet's train
  folder (``ImageFolder``, ``mtil/src/datasets/imagenet.py``) and, apart from them, every
  *caption* of Conceptual Captions (``mtil/src/datasets/cc.py``: the ``title`` column of
  ``Validation_GCC-1.1.0-Validation_output.csv``, which ``mtil/gather_cc.py`` writes from the
  ``caption<TAB>url`` lines of ``Validation_GCC-1.1.0-Validation.tsv``).
- ZSCL on class-incremental CIFAR-100 (``cil/continual_clip/models.py``, ``ref_dataset:
  conceptual_captions``): Conceptual Captions' own images and captions, i.e. *pairs* read from
  gather_cc's output (``title<TAB>filepath``, paths relative to the file's folder as
  ``CsvDataset`` joins them).

With ``size: null`` ZSCL draws every step's reference batch from the whole source (ZSCL: a
shuffled loader over all of ImageNet's training images, ``mtil/src/datasets/imagenet.py``): the
set stays on disk as a ``ReferenceStream`` whose batches the DataLoader's workers decode, in a
seeded order that goes through every image before any repeats. Otherwise a reference set is
sampled once (``size`` images, ``seed``) and decoded at the model's resolution with the test
transform (ZSCL reads its reference images with ``test_preprocess``), so the methods hold it in
memory as an ``ImageSet``; A-GEM and GEM, which keep replayed pairs in memory, always read it so.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from clip_continual.data.common import DataFormatError, ImageSet
from clip_continual.data.image_folder import image_folder_index
from clip_continual.data.images import BadImageError, check_images_present, open_image
from clip_continual.data.index import ImageIndex
from clip_continual.data.loading import IndexImages, LoaderConfig, ModelResolutionArray, StreamedImages
from clip_continual.data.raw_files import (
    EmptyDataError, MissingInputError, RawFormatError, require_file, require_folder,
)

logger = logging.getLogger(__name__)

GATHER_CC_HEADER = ("title", "filepath")  # ZSCL mtil/gather_cc.py: out.write("title\tfilepath\n")
PAIRS_CLASS = "image-caption pair"

_PAIRS_FIX = ("a folder of img2dataset pairs (<key>.jpg beside <key>.json with its \"caption\"; CL-CLIP "
              "replays a LAION subset) or Conceptual Captions as mtil/gather_cc.py leaves it "
              "(*_output.csv: title<TAB>filepath)")
_IMAGES_FIX = "an image folder with one folder per class, e.g. ImageNet's train folder (ZSCL)"
_CAPTIONS_FIX = ("a Conceptual Captions file: Validation_GCC-1.1.0-Validation.tsv or Train_GCC-training.tsv "
                 "(caption<TAB>url per line) or gather_cc's *_output.csv (ZSCL: the validation captions)")


class ReferenceConfigError(DataFormatError):
    """``<benchmark>.reference`` does not give what the chosen method needs, or a bad size."""


@dataclass(frozen=True)
class ReferenceSettings:
    """``<benchmark>.reference``: ``pairs`` (image-caption pairs), or ``images`` (an image
    folder) with ``captions`` (a caption file); ``size`` images sampled with ``seed``;
    ``captions_size`` captions kept of an unpaired caption file (None: all, as ZSCL)."""

    owner: str
    pairs: str | None = None
    images: str | None = None
    captions: str | None = None
    size: int = 10000
    captions_size: int | None = None
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, owner: str) -> ReferenceSettings:
        settings = cls(owner=owner, **dict(params or {}))
        for key in ("size", "captions_size"):
            value = getattr(settings, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ReferenceConfigError(f"{owner}.{key} must be a positive integer, got {value!r}")
        return settings


@dataclass(frozen=True)
class ReferenceSource:
    """What a reference set is drawn from: ``index`` (pairs carry their captions) and, for an
    unpaired source, ``captions`` to spread over the images. ``index`` None: no reference
    wanted (the method replays none)."""

    index: ImageIndex | None = None
    captions: tuple[str, ...] = ()
    stream: bool = False  # size null: every step a fresh batch from the whole source (zscl)


def _tsv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n").split("\t") for line in handle if line.strip()]


def _pairs_index(root: str | Path, paths: list[str], captions: list[str]) -> ImageIndex:
    """Image-caption pairs as one pseudo-class index, each image with its own caption."""
    return ImageIndex(root=str(root), paths=tuple(paths), labels=np.zeros(len(paths), np.int64),
                      class_names=(PAIRS_CLASS,), captions=tuple((c,) for c in captions), name="reference")


def read_caption_file(path: str | Path, what: str) -> list[str]:
    """The captions of a Conceptual Captions TSV (``caption<TAB>url``, no header) or of
    gather_cc's output (``title<TAB>filepath`` after a header): the first column of each line."""
    path = require_file(path, what, f"Put {_CAPTIONS_FIX} there.")
    rows = _tsv_rows(path)
    if rows and tuple(rows[0][:2]) == GATHER_CC_HEADER:
        rows = rows[1:]
    captions = [row[0].strip() for row in rows if row[0].strip()]
    if not captions:
        raise EmptyDataError(f"{what}: '{path}' holds no caption. Put {_CAPTIONS_FIX} there.")
    return captions


def gather_cc_pairs(path: Path, what: str) -> ImageIndex:
    """Conceptual Captions images with their captions, from gather_cc's output CSV."""
    rows = _tsv_rows(path)
    if not rows or tuple(rows[0][:2]) != GATHER_CC_HEADER or any(len(row) < 2 for row in rows[1:]):
        raise RawFormatError(f"{what}: '{path}' is not gather_cc's title<TAB>filepath table. Give {_PAIRS_FIX}.")
    rows = rows[1:]
    return _pairs_index(path.parent, [row[1] for row in rows], [row[0] for row in rows])


def _pair_caption(meta: Path) -> str | None:
    """The caption of an img2dataset ``<key>.json`` whose ``<key>.jpg`` lies beside it."""
    try:
        caption = json.loads(meta.read_text(encoding="utf-8")).get("caption")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # img2dataset's *_stats.json and the like
    if isinstance(caption, str) and caption.strip() and meta.with_suffix(".jpg").is_file():
        return caption.strip()
    return None


def img2dataset_pairs(folder: Path, what: str, size: int, seed: int) -> ImageIndex:
    """``size`` pairs drawn with ``seed`` from the ``<key>.json`` files under ``folder`` that
    have a caption and a ``<key>.jpg`` beside them (only as many JSON files are read as the
    draw needs), in path order."""
    metas = sorted(folder.rglob("*.json"))
    chosen: list[tuple[Path, str]] = []
    for i in np.random.default_rng([seed, 0]).permutation(len(metas)):
        caption = _pair_caption(metas[i])
        if caption is not None:
            chosen.append((metas[i], caption))
            if len(chosen) == size:
                break
    if not chosen:
        raise EmptyDataError(f"{what}: no <key>.jpg with a caption in <key>.json under '{folder}'. Give {_PAIRS_FIX}.")
    chosen.sort()
    return _pairs_index(folder, [str(m.with_suffix(".jpg").relative_to(folder)) for m, _ in chosen],
                        [c for _, c in chosen])


def read_pairs(path: str | Path, what: str, size: int, seed: int) -> ImageIndex:
    """``size`` pairs drawn with ``seed`` from an img2dataset folder or gather_cc's output."""
    path = Path(path)
    if path.is_dir():
        return img2dataset_pairs(path, what, size, seed)
    if not path.is_file():
        raise MissingInputError(f"{what}: nothing at '{path}'. Put there {_PAIRS_FIX}.")
    return _sample(gather_cc_pairs(path, what), size, seed)


def _missing(need: str, keys: str, fix: str) -> ReferenceConfigError:
    return ReferenceConfigError(f"{need}: set {keys} to {fix}. (Or choose a method without one, e.g. ft or vr_lwf.)")


def reference_source(settings: ReferenceSettings, method: str, paired: bool) -> ReferenceSource:
    """The files behind the reference set, checked and indexed (no pixel decoded yet); a
    ``paired`` method (A-GEM, GEM) needs ``pairs``. Raises one error naming the parameter."""
    owner = settings.owner
    stream = settings.size is None and not paired
    if settings.pairs is not None:
        index = read_pairs(settings.pairs, f"{owner}.pairs", settings.size, settings.seed)
        check_images_present(index, f"{owner}.pairs", f"Keep the images where the file names them ({_PAIRS_FIX}).")
        return ReferenceSource(index, stream=stream)
    if paired:
        raise _missing(f"method '{method}' replays image-caption pairs and {owner}.pairs is null",
                       f"{owner}.pairs", _PAIRS_FIX)
    if settings.images is None or settings.captions is None:
        raise _missing(f"method '{method}' needs a reference set and {owner} gives none",
                       f"{owner}.pairs, or {owner}.images and {owner}.captions",
                       f"{_PAIRS_FIX}; or {_IMAGES_FIX}, and {_CAPTIONS_FIX}")
    require_folder(settings.images, f"{owner}.images", f"Put {_IMAGES_FIX} there.")
    index = image_folder_index(settings.images, name="reference")
    captions = read_caption_file(settings.captions, f"{owner}.captions")
    if settings.captions_size is not None and settings.captions_size < len(captions):
        rng = np.random.default_rng([settings.seed, 1])
        captions = [captions[i] for i in np.sort(rng.choice(len(captions), settings.captions_size, replace=False))]
    return ReferenceSource(_sample(index, settings.size, settings.seed), tuple(captions), stream=stream)


def _sample(index: ImageIndex, size: int | None, seed: int) -> ImageIndex:
    """``size`` examples drawn once with ``seed`` (all when there are fewer, or size None), in
    index order."""
    if size is None or len(index) <= size:
        return index
    return index.subset(np.sort(np.random.default_rng([seed, 0]).choice(len(index), size, replace=False)))


def spread_captions(captions: tuple[str, ...], count: int) -> np.ndarray:
    """Unpaired captions as an (count, K) array, caption j in row j mod count ('' pads): all of
    them reach ZSCL (which reads every caption), none is repeated."""
    width = max(1, -(-len(captions) // max(count, 1)))
    padded = list(captions) + [""] * (width * count - len(captions))
    return np.asarray(padded, dtype=str).reshape(width, count).T


def decode_reference(source: ReferenceSource, image_size: int,
                     loader: LoaderConfig | None = None) -> ImageSet | ReferenceStream:
    """The reference set in memory at the model's resolution; unreadable images are skipped
    (logged). An empty set when no reference is wanted; a ``ReferenceStream`` (read by
    ``loader``'s workers) for a streamed source."""
    index = source.index
    if index is not None and source.stream:
        captions = (spread_captions(source.captions, len(index)) if source.captions
                    else np.asarray([c[0] for c in index.captions], dtype=str).reshape(-1, 1))
        logger.info("reference set: streamed from all %d images under '%s'", len(index), index.root)
        return ReferenceStream(index, captions, image_size, loader or LoaderConfig())
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    if index is None:
        return ImageSet(empty, np.zeros(0, np.int64), (PAIRS_CLASS,), np.zeros((0, 1), dtype=str))
    images, kept, decode = [], [], ModelResolutionArray(image_size)
    for i in tqdm(range(len(index)), desc="reference set", unit="image"):
        try:
            images.append(decode(open_image(index, i)))
            kept.append(i)
        except BadImageError as error:
            logger.warning("reference set: %s", error)
    if not kept:
        raise EmptyDataError(f"reference set: none of the {len(index)} images under '{index.root}' could be read")
    logger.info("reference set: %d images at %d px (%d unreadable skipped)", len(kept), image_size,
                len(index) - len(kept))
    if source.captions:
        captions = spread_captions(source.captions, len(kept))
    else:
        captions = np.asarray([index.captions[i][0] for i in kept], dtype=str).reshape(-1, 1)
    return ImageSet(np.stack(images), index.labels[kept], index.class_names, captions)


@dataclass(frozen=True)
class ReferenceStream:
    """Reference images read from their files as training goes (``size: null``): step ``s``
    takes the next ``count`` images of a seeded permutation of the whole source, a new
    permutation each pass (ZSCL's shuffled loader), decoded at the model's resolution by the
    DataLoader's workers. ``captions`` as ``ImageSet.captions`` (one row per image)."""

    index: ImageIndex
    captions: np.ndarray
    image_size: int
    loader: LoaderConfig
    steps_per_chunk: int = 50  # one DataLoader (its workers prefetching) per 50 steps

    def __len__(self) -> int:
        return len(self.index)

    def step_rows(self, seed: int, step: int, count: int) -> np.ndarray:
        """The rows of the loop's ``step`` (>= 0): a pure function of (seed, step, count)."""
        count = min(count, len(self))
        per_pass = len(self) // count
        rounds, position = divmod(step, per_pass)
        order = _permutation(seed, rounds, len(self))
        return order[position * count:(position + 1) * count]

    def batches(self, seed: int, count: int, first_step: int = 0):
        """``(step, rows, uint8 images)`` for steps ``first_step``, ``first_step + 1``, ..."""
        images = StreamedImages(IndexImages(self.index), self.loader)
        step = first_step
        while True:
            steps = range(step, step + self.steps_per_chunk)
            rows = np.concatenate([self.step_rows(seed, s, count) for s in steps])
            width = len(rows) // len(steps)
            for s, (chunk, pixels) in zip(steps, images.decoded(rows, width, self.image_size)):
                yield s, chunk, pixels
            step += self.steps_per_chunk


@functools.lru_cache(maxsize=2)  # one pass's order serves all its steps
def _permutation(seed: int, rounds: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, _STREAM_PASS, rounds]).permutation(size)


_STREAM_PASS = 23  # keeps the stream's order apart from the sampling of a fixed set
