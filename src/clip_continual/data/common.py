"""The in-memory form of every prepared image set, and its plain-array form for storage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataFormatError(ValueError):
    """A prepared or raw data file does not have the shape or content we expect."""


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8, N x H x W x 3) with integer labels, class names and optional captions.

    ``captions`` is an N x K array of strings (K captions per image) or None.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    captions: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataFormatError(
                f"images must be a uint8 array of shape (N, H, W, 3), got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if self.labels.shape != (len(self.images),):
            raise DataFormatError(
                f"labels must have shape ({len(self.images)},), got {self.labels.shape}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataFormatError(
                f"labels must lie in [0, {len(self.class_names)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )
        if self.captions is not None and (
            self.captions.ndim != 2 or len(self.captions) != len(self.images)
        ):
            raise DataFormatError(
                f"captions must be an (N, K) array with N = {len(self.images)}, got "
                f"{self.captions.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(
            images=self.images[indices],
            labels=self.labels[indices],
            class_names=self.class_names,
            captions=None if self.captions is None else self.captions[indices],
        )

    def restrict_to_classes(self, classes: list[int] | tuple[int, ...]) -> ImageSet:
        """The images whose label is in ``classes``; labels keep their global ids."""
        return self.subset(np.flatnonzero(np.isin(self.labels, np.asarray(classes))))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "images": self.images,
            "labels": self.labels.astype(np.int64),
            "class_names": np.asarray(self.class_names, dtype=str),
        }
        if self.captions is not None:
            arrays["captions"] = self.captions.astype(str)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ImageSet:
        missing = {"images", "labels", "class_names"} - set(arrays)
        if missing:
            raise DataFormatError(f"prepared image set lacks the arrays {sorted(missing)}")
        captions = arrays.get("captions")
        return cls(
            images=np.asarray(arrays["images"]),
            labels=np.asarray(arrays["labels"]).astype(np.int64),
            class_names=tuple(str(name) for name in arrays["class_names"]),
            captions=None if captions is None else np.asarray(captions),
        )
