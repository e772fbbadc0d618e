"""Decoding one example of an ``ImageIndex``: the file opened, decoded in full, cropped to its box.

A file that cannot be read or decoded raises ``BadImageError`` naming it, so a loader can skip
and count isolated bad images instead of dying mid-epoch. Plain Python; no Kedro import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clip_continual.data.common import DataFormatError
from clip_continual.data.index import ImageIndex
from clip_continual.data.raw_files import MissingInputError


class BadImageError(DataFormatError):
    """One image file cannot be read or decoded (missing, truncated, not an image).

    A loader may skip and count such images; ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"unreadable image '{path}': {reason}. Replace the file with an intact copy, or remove it "
            "and rebuild the index."
        )


def open_image(index: ImageIndex, i: int) -> Image.Image:
    """Example ``i`` of ``index`` as an RGB PIL image, decoded in full and cropped to its box.

    The box ``(x, y, w, h)`` is cut as ``(x, y, x + w, y + h)``, which PIL rounds to whole pixels
    (as the paper's loader does, CL-CLIP data.py ``OST.__getitem__``). Any failure to read or
    decode the file raises ``BadImageError`` naming it.
    """
    path = index.path(i)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a transform
            rgb = image.convert("RGB")
    except FileNotFoundError as error:
        raise BadImageError(path, "no such file") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error
    if index.boxes is None:
        return rgb
    x, y, width, height = (float(v) for v in index.boxes[i])
    return rgb.crop((x, y, x + width, y + height))


def check_images_present(index: ImageIndex, what: str, fix: str, sample: int = 32) -> None:
    """Raise ``MissingInputError`` when none of ``sample`` files spread over ``index`` exists.

    That is a wrong or empty image folder, caught in milliseconds before any work; isolated
    missing or broken files are left to the loader, which skips and counts them.
    """
    if not len(index):
        return
    picks = sorted({int(i) for i in np.linspace(0, len(index) - 1, num=min(sample, len(index)))})
    if not any(index.path(i).is_file() for i in picks):
        raise MissingInputError(
            f"{what}: none of {len(picks)} image files sampled from the index exists, e.g. "
            f"'{index.path(picks[0])}'. {fix}"
        )
