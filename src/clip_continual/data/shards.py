"""Prepared splits: every example decoded, cropped and resized once, stored as WebDataset shards.

A raw split (an ``ImageIndex``: files, crop boxes, labels, captions) is prepared once: each
crop is cut out of its image, resized so its shorter side is at most ``max_side`` (the paper's
train resize, 256) and written as JPEG into tar shards with WebDataset's ``ShardWriter`` (the
format open_clip trains from: ``<key>.jpg``, ``<key>.cls``, ``<key>.json``). The byte offset
of every image inside its shard is recorded in ``index.npz``, so a map-style DataLoader reads
any example with one positional read: batches keep the exact, resumable order of the training
loop while the shards stay readable by any WebDataset pipeline.

Writing is atomic: shards go to a temporary folder beside the target (``.<name>.partial-<pid>-*``,
created with the user's umask, so a group can read the result) and the folder is renamed into
place only when complete, so no later run ever reads a half-written split; the folders a killed
run left are removed at the next start. The manifest holds a fingerprint of the inputs (each
file's size and modification time included: a replaced image prepares the split again) and the
settings, and every shard's size: an up-to-date, intact split is never rewritten, a truncated one
is.

Unreadable or truncated images are skipped and counted per file (``bad_images`` in the manifest,
``bad_crops`` the examples they held); more than ``max_bad_images`` files stop the preparation,
naming the first ones.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clip_continual.data.common import DataFormatError
from clip_continual.data.images import BadImageError, open_image
from clip_continual.data.index import ImageIndex

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: file sizes and times in the fingerprint, shard sizes in the manifest
MANIFEST = "manifest.json"
INDEX = "index.npz"
SHARD_PATTERN = "shard-%06d.tar"
JPEG_QUALITY = 95
MAX_SHARD_COUNT = 10_000  # images per shard (a few hundred MB at 256 px)


class TooManyBadImages(DataFormatError):
    """More unreadable images than ``max_bad_images`` allows."""


@dataclass(frozen=True)
class ShardSettings:
    max_side: int = 256
    max_bad_images: int = 0
    num_workers: int = 0
    shard_size: int = MAX_SHARD_COUNT

    def __post_init__(self) -> None:
        for name in ("max_side", "shard_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if int(self.max_bad_images) < 0 or int(self.num_workers) < 0:
            raise ValueError("max_bad_images and num_workers must be integers >= 0")


@dataclass(frozen=True)
class ShardRequest:
    """What a preparation node hands to the catalog: the raw split and how to prepare it."""

    index: ImageIndex
    settings: ShardSettings


def example_files(index: ImageIndex) -> list[Path]:
    """The files an index's examples are decoded from, each once: an ``ImageIndex``'s paths, a
    torchvision source's listed image files (none for array datasets: CIFAR, MNIST)."""
    if hasattr(index, "files"):
        return [Path(path) for path in dict.fromkeys(index.files)]
    root = Path(index.root)
    return [root / path for path in dict.fromkeys(index.paths)]


def _file_stats(paths: list[Path]) -> bytes:
    """Size and modification time (ns) of every file; -1 for a missing one. A stat per file is
    ~10 us: 0.1 s per 10,000 files, far cheaper than hashing the images' contents."""
    stats = np.full((len(paths), 2), -1, dtype=np.int64)
    for row, path in enumerate(paths):
        try:
            status = os.stat(path)
        except OSError:
            continue
        stats[row] = status.st_size, status.st_mtime_ns
    return stats.tobytes()


def fingerprint(index: ImageIndex, settings: ShardSettings) -> str:
    """Changes when the examples, their crops, labels, classes, captions or the size change, or
    when a file is replaced (its size or modification time)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, settings.max_side, str(Path(index.root).resolve()),
                              list(index.class_names), index.name]).encode())
    digest.update("\n".join(index.paths).encode())
    digest.update(np.ascontiguousarray(index.labels).tobytes())
    if index.boxes is not None:
        digest.update(np.ascontiguousarray(index.boxes).tobytes())
    if index.captions is not None:
        digest.update(json.dumps(index.captions).encode())
    digest.update(_file_stats(example_files(index)))
    return digest.hexdigest()


def resize_shorter_side(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so that the shorter side is at most ``max_side``."""
    shorter = min(image.size)
    if shorter <= max_side:
        return image
    scale = max_side / shorter
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


class _EncodedExamples(Dataset):
    """Example ``i`` -> ``(i, JPEG bytes)`` or ``(i, error message)`` for a bad image."""

    def __init__(self, index: ImageIndex, max_side: int):
        self.index = index
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, bytes | str]:
        try:
            # An ImageIndex is decoded from its files; an image source opens its own examples.
            opened = self.index.open_image(i) if hasattr(self.index, "open_image") else open_image(self.index, i)
            image = resize_shorter_side(opened, self.max_side)
        except BadImageError as error:
            return i, str(error)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return i, buffer.getvalue()


def _encoded(index: ImageIndex, settings: ShardSettings):
    dataset = _EncodedExamples(index, settings.max_side)
    loader = DataLoader(dataset, batch_size=None, num_workers=settings.num_workers,
                        prefetch_factor=8 if settings.num_workers else None)
    return tqdm(loader, total=len(dataset), desc=f"prepare {index.name or 'split'}", leave=False)


def _count_bad(bad: dict[str, list[str]], path: str, message: str, index: ImageIndex, limit: int) -> None:
    """Record a skipped example under its file: the limit counts files, not crops (one broken
    COCO image holds several boxes)."""
    if path not in bad:
        logger.warning("skipping a bad image (%d so far): %s", len(bad) + 1, message)
    bad.setdefault(path, []).append(message)
    if len(bad) > limit:
        first = "; ".join(messages[0] for messages in list(bad.values())[:5])
        raise TooManyBadImages(
            f"{len(bad)} unreadable images in '{index.name or index.root}', more than "
            f"max_bad_images = {limit}. First: {first}. "
            f"Replace or delete these files, or raise max_bad_images to skip them."
        )


def _write_shards(index: ImageIndex, settings: ShardSettings, folder: Path) -> tuple[list[int], dict[str, list[str]]]:
    """Shards into ``folder``; returns the kept example ids and the bad files' messages."""
    import webdataset as wds

    kept, bad = [], {}
    pattern = str(folder / SHARD_PATTERN)
    with wds.ShardWriter(pattern, maxcount=settings.shard_size, verbose=0) as sink:
        for i, payload in _encoded(index, settings):
            if isinstance(payload, str):
                _count_bad(bad, index.paths[i], payload, index, settings.max_bad_images)
                continue
            meta = {"label": int(index.labels[i]), "source": index.paths[i]}
            if index.captions is not None:
                meta["captions"] = list(index.captions[i])
            sink.write({"__key__": f"{len(kept):09d}", "jpg": payload, "cls": int(index.labels[i]), "json": meta})
            kept.append(i)
    return kept, bad


def _member_offsets(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Shard names and, per kept example in order, its shard number, data offset and size."""
    shards = sorted(p.name for p in folder.glob("shard-*.tar"))
    shard_ids, offsets, sizes = [], [], []
    for number, name in enumerate(shards):
        with tarfile.open(folder / name) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    shard_ids.append(number)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
    return shards, np.asarray(shard_ids, np.int32), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)


def _save_index(folder: Path, index: ImageIndex, kept: list[int], bad: dict[str, list[str]], key: str) -> None:
    shards, shard_ids, offsets, sizes = _member_offsets(folder)
    if len(offsets) != len(kept):
        raise RuntimeError(f"wrote {len(kept)} examples but found {len(offsets)} images in the shards")
    sub = index.subset(np.asarray(kept, dtype=np.int64))
    arrays = {"labels": sub.labels, "shard": shard_ids, "offset": offsets, "size": sizes,
              "source": np.asarray(sub.paths, dtype=str)}
    np.savez(folder / INDEX, **arrays)
    manifest = {
        "format_version": FORMAT_VERSION, "fingerprint": key, "name": index.name,
        "class_names": list(index.class_names), "shards": shards, "count": len(kept),
        "shard_sizes": [(folder / name).stat().st_size for name in shards],
        "bad_images": len(bad), "bad_crops": sum(len(messages) for messages in bad.values()),
        "bad_examples": [messages[0] for messages in list(bad.values())[:100]],
        "dropped_boxes": int(getattr(index, "dropped_boxes", 0)),
        "captions": None if sub.captions is None else [list(c) for c in sub.captions],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _replace_folder(source: Path, target: Path) -> None:
    """Put a finished folder in place; an old version is removed only after the move."""
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(old)
    source.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def damaged_shard(folder: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with a prepared split's files (a shard missing or not of the size written,
    e.g. cut short by a full disk or a copy), or None when every shard is intact."""
    sizes = manifest.get("shard_sizes")
    if not (folder / INDEX).is_file():
        return f"'{folder / INDEX}' is missing"
    if sizes is None or len(sizes) != len(manifest.get("shards", ())):
        return f"'{folder / MANIFEST}' records no shard sizes (written by an older version)"
    for name, size in zip(manifest["shards"], sizes):
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            return f"shard '{path}' is {'missing' if found is None else f'{found} bytes'}, {size} were written"
    return None


def _partial_owner_alive(path: Path) -> bool:
    """Whether the process named in a ``.partial-<pid>-`` or ``.old-<pid>`` folder still runs
    (then it is another run's work in progress, left alone)."""
    found = re.search(r"\.(?:partial|old)-(\d+)", path.name)
    if found is None or int(found.group(1)) == os.getpid():
        return False
    pid = found.group(1)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_partial_folders(folder: Path) -> list[Path]:
    """Remove the half-written folders a killed preparation of ``folder`` left beside it."""
    removed = []
    for path in [*folder.parent.glob(f".{folder.name}.partial-*"), *folder.parent.glob(f"{folder.name}.old-*")]:
        if path.is_dir() and not _partial_owner_alive(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d half-written folders left by an interrupted preparation: %s",
                    len(removed), ", ".join(p.name for p in removed))
    return removed


def _work_folder(folder: Path) -> Path:
    """A new folder beside ``folder``, created with the umask (mkdtemp's would be 0700: a group
    could not read the prepared split), named after this process."""
    work = folder.parent / f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    return work


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def prepare_split(index: ImageIndex, folder: str | os.PathLike, settings: ShardSettings | None = None) -> dict[str, Any]:
    """Write ``index`` as a prepared split in ``folder`` unless it is already up to date there.
    Returns the manifest."""
    settings = settings or ShardSettings()
    folder = Path(folder)
    key = fingerprint(index, settings)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_partial_folders(folder)
    current = read_manifest(folder)
    if current is not None and current.get("fingerprint") == key:
        damage = damaged_shard(folder, current)
        if damage is None:
            logger.info("prepared split '%s' is up to date (%d images); not rewritten", folder, current["count"])
            return current
        logger.warning("prepared split '%s' is damaged (%s); preparing it again", folder, damage)
    if len(index) == 0:
        raise DataFormatError(f"split '{index.name or index.root}' has no examples; check its source files")
    work = _work_folder(folder)
    try:
        kept, bad = _write_shards(index, settings, work)
        if not kept:
            raise DataFormatError(f"no readable image in split '{index.name or index.root}'")
        _save_index(work, index, kept, bad, key)
        _replace_folder(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("prepared split '%s': %d images in %s, %d bad image files skipped", index.name, len(kept), folder, len(bad))
    return read_manifest(folder)


_REPREPARE = ("Delete the folder and run the benchmark's preparation again "
              "(kedro run --pipelines <benchmark>), which rewrites it")


class PreparedSplit:
    """A prepared split on disk, read one example at a time (``LazyImages``)."""

    def __init__(self, folder: str | os.PathLike, selection: np.ndarray | None = None):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None or not (self.folder / INDEX).is_file():
            raise DataFormatError(
                f"'{self.folder}' is not a prepared split (no {MANIFEST} / {INDEX}); run the "
                f"benchmark's preparation nodes (kedro run --pipelines <benchmark>) to write it"
            )
        damage = damaged_shard(self.folder, manifest)
        if damage is not None:
            raise DataFormatError(f"prepared split '{self.folder}' is damaged: {damage}. {_REPREPARE}")
        self.manifest = manifest
        try:
            with np.load(self.folder / INDEX, allow_pickle=False) as arrays:
                self._arrays = {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, EOFError) as error:
            raise DataFormatError(f"prepared split '{self.folder}': '{INDEX}' cannot be read ({error}). "
                                  f"{_REPREPARE}") from error
        count = len(self._arrays["labels"])
        self.selection = np.arange(count) if selection is None else np.asarray(selection, dtype=np.int64)
        self.labels = self._arrays["labels"][self.selection]
        self.class_names = tuple(manifest["class_names"])
        all_captions = manifest.get("captions")
        self.captions = None if all_captions is None else tuple(tuple(all_captions[i]) for i in self.selection)
        self.name = manifest.get("name", "")
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.selection)

    def __getstate__(self) -> dict[str, Any]:  # file descriptors stay with their process
        return {**self.__dict__, "_files": {}}

    def _descriptor(self, shard: int) -> int:
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / self.manifest["shards"][shard], os.O_RDONLY)
        return self._files[shard]

    def _where(self, i: int) -> str:
        j = int(self.selection[i])
        return (f"example {j} ('{self._arrays['source'][j]}') in shard "
                f"'{self.folder / self.manifest['shards'][int(self._arrays['shard'][j])]}'")

    def image_bytes(self, i: int) -> bytes:
        j = self.selection[i]
        shard, offset, size = (int(self._arrays[k][j]) for k in ("shard", "offset", "size"))
        data = os.pread(self._descriptor(shard), size, offset)
        if len(data) != size:
            raise DataFormatError(f"{self._where(i)} is cut short ({len(data)} of {size} bytes). {_REPREPARE}")
        return data

    def open_image(self, i: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.image_bytes(i))) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise DataFormatError(f"{self._where(i)} is not a readable JPEG ({error}). {_REPREPARE}") from error

    def subset(self, indices: Sequence[int]) -> PreparedSplit:
        return PreparedSplit(self.folder, self.selection[np.asarray(indices, dtype=np.int64)])

    def restrict_to_classes(self, classes: Sequence[int]) -> PreparedSplit:
        return self.subset(np.flatnonzero(np.isin(self.labels, np.asarray(classes))))

    def __del__(self) -> None:
        for descriptor in getattr(self, "_files", {}).values():
            try:
                os.close(descriptor)
            except OSError:
                pass

