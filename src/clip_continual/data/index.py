"""The lazy form of an image dataset on disk: an index of files, boxes, labels and captions.

A format module (COCO crops, an image folder, EuroSAT, Karpathy captions, torchvision sets)
reads a user's files once and returns an ``ImageIndex``; pixels are decoded on demand, by
DataLoader workers or while shards are prepared. The in-memory ``ImageSet`` remains the form of
the small embedded sets.

Plain Python; no Kedro import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_continual.data.common import DataFormatError


@dataclass(frozen=True)
class ImageIndex:
    """``paths[i]`` (relative to ``root``) holds example ``i``; ``boxes[i]`` is its crop
    ``(x, y, width, height)`` in pixels of the original image, float64 as in the JSON files
    (None: whole images);
    ``labels[i]`` its class id in ``class_names`` (-1 where a set has no classes, e.g. a
    retrieval gallery); ``captions[i]`` its captions (retrieval sets), else None."""

    root: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    boxes: np.ndarray | None = None
    captions: tuple[tuple[str, ...], ...] | None = None
    name: str = ""
    dropped_boxes: int = 0  # boxes the reader left out as degenerate (counted in the manifest)

    def __post_init__(self) -> None:
        count = len(self.paths)
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        if self.labels.shape != (count,):
            raise DataFormatError(f"{self._label()}: {count} paths but labels of shape {self.labels.shape}")
        if count and (self.labels.min() < -1 or self.labels.max() >= len(self.class_names)):
            raise DataFormatError(f"{self._label()}: labels must lie in [-1, {len(self.class_names)})")
        if self.boxes is not None:
            object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64))
            if self.boxes.shape != (count, 4):
                raise DataFormatError(f"{self._label()}: boxes must have shape ({count}, 4)")
        if self.captions is not None and len(self.captions) != count:
            raise DataFormatError(f"{self._label()}: {count} paths but {len(self.captions)} caption lists")

    def _label(self) -> str:
        return f"image index '{self.name or self.root}'"

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(self.root) / self.paths[i]

    def subset(self, indices: np.ndarray) -> ImageIndex:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageIndex(
            root=self.root,
            paths=tuple(self.paths[i] for i in indices),
            labels=self.labels[indices],
            class_names=self.class_names,
            boxes=None if self.boxes is None else self.boxes[indices],
            captions=None if self.captions is None else tuple(self.captions[i] for i in indices),
            name=self.name,
            dropped_boxes=self.dropped_boxes,
        )

    def restrict_to_classes(self, classes: list[int] | tuple[int, ...]) -> ImageIndex:
        """The examples whose label is in ``classes``; labels keep their global ids."""
        return self.subset(np.flatnonzero(np.isin(self.labels, np.asarray(classes))))
