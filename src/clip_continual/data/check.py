"""What ``kedro data check`` verifies: for every dataset a benchmark reads, its folder, its counts
per split (and class where known) against the published ones, the checksum of each split we
derive ourselves, and the free disk space against what preparation will write.

Everything works at index level (folder listings and annotation files, never an image decoded),
so a check of MTIL's eleven datasets takes seconds. The published counts live in
``published_counts.csv`` and the pinned split checksums in ``pinned_splits.csv``, both beside this
module. ``require_present`` is the cheap part (folders) that ``kedro run`` runs
before its first node.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from clip_continual.data.common import DataFormatError
from clip_continual.data.torchvision_sets import SPECS

GIB = 1024 ** 3


class DataCheckError(DataFormatError):
    """A benchmark's data is missing, incomplete or cannot be prepared here."""


@dataclass(frozen=True)
class Published:
    count: int
    classes: int | None
    prepared_kib: float
    source: str


def _table(name: str) -> list[dict[str, str]]:
    text = resources.files("clip_continual.data").joinpath(name).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


def published_counts() -> dict[tuple[str, str], Published]:
    """(dataset, split) -> the published count, class count and prepared size per image."""
    return {(row["dataset"], row["split"]): Published(int(row["count"]), int(row["classes"]) if row["classes"] else None,
                                                      float(row["prepared_kib"]), row["source"])
            for row in _table("published_counts.csv")}


def pinned_splits() -> dict[tuple[str, str], tuple[int, str]]:
    """(dataset, split) -> (count, sha256 of the sorted file list) of the splits we derive."""
    return {(row["dataset"], row["split"]): (int(row["count"]), row["sha256"]) for row in _table("pinned_splits.csv")}


def split_checksum(paths: Iterable[str]) -> str:
    """sha256 of the split's relative file paths, sorted, one per line ('/' separators)."""
    return hashlib.sha256("\n".join(sorted(str(p).replace(os.sep, "/") for p in paths)).encode()).hexdigest()


@dataclass(frozen=True)
class Need:
    """A dataset a benchmark reads: its key (in the published tables), its folder, the splits
    it reads and the raw split names whose prepared folders preparation writes."""

    key: str
    folder: Path
    splits: tuple[str, ...]
    raw_splits: tuple[str, ...]
    data: dict


def _locate(raw: str, data: dict[str, Any]) -> tuple[str, Path, str]:
    """A raw split (``coco_train``, ``mtil_dtd_test``...) -> (dataset key, folder, split)."""
    if raw.startswith("coco_"):
        return "coco2014", Path(data["coco_root"]), {"coco_train": "train", "coco_test": "test"}.get(raw, "test")
    if raw == "flickr_retrieval":
        return "flickr30k", Path(data["flickr_root"]), "test"
    if raw.startswith("eurosat_"):
        return "eurosat_rgb", Path(data["eurosat_root"]), raw.removeprefix("eurosat_")
    if raw == "zero_shot":
        kind = data["zero_shot"].get("kind", "image_folder")
        return ("imagenet_tiered_test" if kind == "tiered_imagenet" else "zero_shot_folder"), Path(data["zero_shot"]["root"]), "test"
    if raw.startswith("cifar100_cil_"):
        return "cifar100", Path(data["root"]) / SPECS["cifar100"].folder, raw.removeprefix("cifar100_cil_")
    if raw.startswith("mtil_"):
        key, split = raw.removeprefix("mtil_").rsplit("_", 1)
        return key, Path(data["root"]) / SPECS[key].folder, split
    raise DataCheckError(f"no data check knows the raw split '{raw}'; add it to clip_continual.data.check._locate")


def needs(raw_splits: Iterable[str], data: dict[str, Any]) -> list[Need]:
    """The datasets behind a benchmark's raw splits, each once, in first-use order."""
    found: dict[str, Need] = {}
    for raw in raw_splits:
        key, folder, split = _locate(raw, data)
        old = found.get(key)
        splits = (*old.splits, split) if old and split not in old.splits else (old.splits if old else (split,))
        found[key] = Need(key, folder, splits, ((*old.raw_splits, raw) if old else (raw,)), data)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# The cheap part: folders present, disk space
# ---------------------------------------------------------------------------------------------


def preparation_bytes(items: list[Need], prepared_root: Path) -> int:
    """What preparation will write: the published count of each split not yet prepared times
    the typical size of one prepared image (a JPEG of at most 256 px, or smaller originals)."""
    table = published_counts()
    total = 0.0
    for need in items:
        for split, raw in zip(need.splits, need.raw_splits):
            if (prepared_root / raw / "manifest.json").is_file():
                continue
            row = table.get((need.key, split)) or table.get((need.key, f"karpathy_{split}"))
            if row is not None:
                total += row.count * row.prepared_kib * 1024
    return int(total)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_problem(items: list[Need], prepared_root: Path) -> str | None:
    need = preparation_bytes(items, prepared_root)
    free = shutil.disk_usage(_existing_parent(prepared_root)).free
    if free >= need:
        return None
    return (f"preparation writes about {need / GIB:.1f} GiB under '{prepared_root}', which has "
            f"{free / GIB:.1f} GiB free: free some space, or make that folder a link to a larger disk")


def _fix(key: str) -> str:
    from clip_continual.data.fetch import how_to_get  # fetch knows the sources

    return how_to_get(key)


def require_present(raw_splits: Iterable[str], data: dict[str, Any]) -> None:
    """The cheap check before a run's first node: every dataset folder there (the room on disk
    is checked with all else the run writes, ``clip_continual.runtime.preflight``). Raises one
    ``DataCheckError`` listing every missing folder and its fix."""
    problems = [f"{need.key}: no folder at '{need.folder}'. {_fix(need.key)}"
                for need in needs(raw_splits, data) if not need.folder.is_dir()]
    if problems:
        raise DataCheckError("the benchmark's data is not ready (`kedro data check` tells more): "
                             + " | ".join(problems))


# ---------------------------------------------------------------------------------------------
# The full check, one line per dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckLine:
    dataset: str
    ok: bool
    text: str

    def __str__(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'} {self.dataset:<22} {self.text}"


def _compare(key: str, found: dict[str, int]) -> list[str]:
    """Differences of the found counts from the published ones, as readable clauses."""
    table = published_counts()
    wrong = []
    for split, count in found.items():
        row = table.get((key, split))
        if row is not None and row.count != count:
            wrong.append(f"{split} has {count}, published {row.count}")
    return wrong


def _count_files(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for entry in entries if entry.name.lower().endswith((".jpg", ".jpeg", ".png")))


def _karpathy_counts(path: Path) -> dict[str, int]:
    entries = json.loads(path.read_text(encoding="utf-8"))["images"]
    counts: dict[str, int] = {}
    for entry in entries:
        split = "train" if entry["split"] == "restval" else entry["split"]
        counts[f"karpathy_{split}"] = counts.get(f"karpathy_{split}", 0) + 1
    return counts


def _coco_counts(need: Need) -> dict[str, int]:
    counts = {f"{folder}_files": _count_files(need.folder / folder)
              for folder in ("train2014", "val2014") if (need.folder / folder).is_dir()}
    karpathy = Path(need.data.get("coco_karpathy_json") or need.folder / "dataset_coco.json")
    if not karpathy.is_file():
        raise DataCheckError(f"no Karpathy split file at '{karpathy}'. {_fix('karpathy')}")
    return {**counts, **_karpathy_counts(karpathy)}


def _flickr_counts(need: Need) -> dict[str, int]:
    images = Path(need.data.get("flickr_images") or need.folder / "flickr30k-images")
    karpathy = Path(need.data.get("flickr_karpathy_json") or need.folder / "dataset_flickr30k.json")
    if not karpathy.is_file():
        raise DataCheckError(f"no Karpathy split file at '{karpathy}'. {_fix('karpathy')}")
    counts = {"images": _count_files(images)} if images.is_dir() else {}
    return {**counts, **_karpathy_counts(karpathy)}


def _eurosat_counts(need: Need) -> dict[str, int]:
    from clip_continual.data.eurosat import eurosat_splits

    splits = eurosat_splits(need.folder, int(need.data.get("eurosat_test_per_class", 500)))
    counts = {"train": len(splits["train"]), "test": len(splits["test"])}
    for folder in sorted({Path(p).parts[0] for p in splits["train"].paths}):
        counts[f"class:{folder}"] = _count_files(need.folder / folder)
    counts["all"] = counts["train"] + counts["test"]
    counts.update({f"sha256:{s}": split_checksum(splits[s].paths) for s in ("train", "test")})  # type: ignore[dict-item]
    return counts


def _tiered_counts(need: Need) -> dict[str, int]:
    from clip_continual.data.tiered_imagenet import tiered_imagenet_test_classes

    present = sum((need.folder / wnid).is_dir() for wnid, _ in tiered_imagenet_test_classes())
    return {"classes": present}


def _mtil_counts(need: Need) -> dict[str, int]:
    from clip_continual.data.torchvision_sets import load_split

    counts: dict[str, Any] = {}
    for split in ("train", "test"):
        source = load_split(need.key, need.folder.parent, split)
        counts[split] = len(source)
        counts[f"classes:{split}"] = len(source.class_names)
        if SPECS[need.key].random_split and source.files:
            counts[f"sha256:{split}"] = split_checksum(os.path.relpath(f, need.folder) for f in source.files)
    return counts


COUNTERS: dict[str, Callable[[Need], dict[str, int]]] = {
    "coco2014": _coco_counts, "flickr30k": _flickr_counts, "eurosat_rgb": _eurosat_counts,
    "imagenet_tiered_test": _tiered_counts, **{key: _mtil_counts for key in SPECS},
}


def _problems(key: str, counts: dict[str, Any]) -> list[str]:
    """Counts, class counts and pinned split checksums that differ from the repository's."""
    table, pins = published_counts(), pinned_splits()
    wrong = _compare(key, {k: v for k, v in counts.items() if ":" not in k or k.startswith("class:")})
    for name, value in counts.items():
        kind, _, split = name.partition(":")
        row = table.get((key, split))
        if kind == "classes" and row is not None and row.classes is not None and value != row.classes:
            wrong.append(f"{split} has {value} classes, published {row.classes}")
        if kind == "sha256" and (key, split) in pins and pins[(key, split)][1] != value:
            wrong.append(f"the {split} file list differs from the pinned one (sha256 {value[:12]}..., "
                         f"pinned {pins[(key, split)][1][:12]}...)")
    return wrong


def _summary(counts: dict[str, Any]) -> str:
    shown = [f"{name} {value}" for name, value in counts.items() if ":" not in name]
    sums = [f"{name.split(':')[1]} {value[:12]}" for name, value in counts.items() if name.startswith("sha256:")]
    return ", ".join(shown) + (f"; split lists sha256 {', '.join(sums)}" if sums else "")


def check_dataset(need: Need) -> CheckLine:
    """One line: OK with the counts found, or what is wrong and how to fix it."""
    if not need.folder.is_dir():
        return CheckLine(need.key, False, f"no folder at '{need.folder}'. {_fix(need.key)}")
    counter = COUNTERS.get(need.key)
    if counter is None:
        return CheckLine(need.key, True, f"folder '{need.folder}' present (no published counts to compare)")
    try:
        counts = counter(need)
    except (DataFormatError, OSError, KeyError, ValueError) as error:
        return CheckLine(need.key, False, f"'{need.folder}' cannot be read: {error}")
    wrong = _problems(need.key, counts)
    if wrong:
        return CheckLine(need.key, False, f"{'; '.join(wrong)} in '{need.folder}': an incomplete or "
                                          f"different copy. {_fix(need.key)}")
    return CheckLine(need.key, True, _summary(counts))


def check_benchmark(raw_splits: Iterable[str], data: dict[str, Any], prepared_root: Path) -> list[CheckLine]:
    """A line per dataset the raw splits read, then the disk-space line."""
    items = needs(raw_splits, data)
    lines = [check_dataset(need) for need in items]
    disk = disk_problem(items, prepared_root)
    estimate = preparation_bytes(items, prepared_root) / GIB
    lines.append(CheckLine("disk", disk is None, disk or f"about {estimate:.1f} GiB to write under '{prepared_root}', "
                                                          f"{shutil.disk_usage(_existing_parent(prepared_root)).free / GIB:.1f} GiB free"))
    return lines
