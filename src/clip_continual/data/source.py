"""One interface for every labelled image dataset a benchmark reads, whatever its storage.

torchvision keeps some datasets as arrays (CIFAR-100, MNIST), others as image files listed in
annotation files or .mat tables. ``ImageSource`` hides the difference: ``len(source)`` examples,
``source[i]`` is ``(PIL RGB image, label)``, ``source.labels`` every label without decoding an
image, plus the class names and prompt templates of the dataset. The preparation step reads any
source once (e.g. into shards); training and evaluation read it through a DataLoader.

Plain Python; no Kedro import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class ImageSource(Protocol):
    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Image.Image, int]: ...


def as_rgb(image: Any) -> Image.Image:
    """torchvision returns mode "L" for MNIST and unconverted JPEGs for Caltech101: always RGB."""
    from clip_continual.data.images import to_rgb  # 16-bit and palette images kept intact

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return to_rgb(image)


@dataclass(frozen=True)
class SubsetSource:
    """The examples ``indices`` of a dataset (anything indexable as ``(image, label)``), in that
    order, with the dataset's labels given up front so that no image is decoded to learn them."""

    name: str
    dataset: Any
    indices: np.ndarray
    all_labels: np.ndarray
    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64))
        object.__setattr__(self, "all_labels", np.asarray(self.all_labels, dtype=np.int64))

    @property
    def labels(self) -> np.ndarray:
        return self.all_labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} outside 0..{len(self) - 1}")
        image, label = self.dataset[int(self.indices[i])]
        return as_rgb(image), int(label)

    def open_image(self, i: int) -> Image.Image:
        """Example ``i``'s image alone (the lazy-image interface of the DataLoader path); a file
        that cannot be decoded raises ``BadImageError``, which preparation skips and counts."""
        from clip_continual.data.images import BadImageError

        try:
            return self[i][0]
        except (OSError, ValueError) as error:  # PIL: truncated, unidentified or unreadable file
            raise BadImageError(self.paths[i], str(error)) from error

    # What preparation records of each example (an ImageIndex's fields): an id per example,
    # stable while the dataset's files are, for the fingerprint and the shard metadata.
    boxes = None
    captions = None

    @property
    def root(self) -> str:
        return str(getattr(self.dataset, "root", ""))

    @property
    def paths(self) -> tuple[str, ...]:
        kind = type(self.dataset).__name__
        return tuple(f"{kind}[{int(i)}]" for i in self.indices)

    @property
    def files(self) -> tuple[str, ...]:
        """The image file of each example where torchvision lists them (the fingerprint of a
        prepared split stats them); empty for datasets kept as arrays (CIFAR-100, MNIST)."""
        listed = _listed_files(self.dataset)
        return () if listed is None else tuple(str(listed[int(i)]) for i in self.indices)

    def subset(self, positions: np.ndarray) -> SubsetSource:
        """The examples at ``positions`` of this source (positions, not dataset indices)."""
        return SubsetSource(
            name=self.name,
            dataset=self.dataset,
            indices=self.indices[np.asarray(positions, dtype=np.int64)],
            all_labels=self.all_labels,
            class_names=self.class_names,
            templates=self.templates,
        )

    def restrict_to_classes(self, classes: list[int] | tuple[int, ...]) -> SubsetSource:
        """The examples whose label is in ``classes``; labels keep their dataset ids."""
        return self.subset(np.flatnonzero(np.isin(self.labels, np.asarray(classes))))


def _listed_files(dataset: Any) -> list[Any] | None:
    """The per-example file list of a torchvision dataset, under the name its class keeps it."""
    for attribute in ("_image_files", "_images"):
        files = getattr(dataset, attribute, None)
        if isinstance(files, list):
            return files
    for attribute in ("_samples", "samples"):  # StanfordCars, ImageFolder (EuroSAT): (path, label)
        pairs = getattr(dataset, attribute, None)
        if isinstance(pairs, list):
            return [path for path, _ in pairs]
    if hasattr(dataset, "index") and hasattr(dataset, "categories") and hasattr(dataset, "y"):  # Caltech101
        return [f"{dataset.root}/101_ObjectCategories/{dataset.categories[label]}/image_{number:04d}.jpg"
                for number, label in zip(dataset.index, dataset.y)]
    return None
