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


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB with its picture intact.

    PIL's ``convert("RGB")`` clips 16-bit grey levels at 255 (a 16-bit PNG turns white) and
    keeps a palette image's transparency warning; both are converted by hand here."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        # 16-bit files span 0..65535; a 32-bit "I" image decoded from one does too. Values that
        # all fit in 8 bits are taken as they are.
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def crop_box(box: np.ndarray) -> tuple[int, int, int, int]:
    """The pixel box PIL cuts for ``(x, y, w, h)``: ``round`` of x, y, x + w, y + h computed in
    float64, as the paper's loader does with the JSON's numbers (float32 shifts some by a pixel)."""
    x, y, width, height = (float(v) for v in box)
    return round(x), round(y), round(x + width), round(y + height)


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
            rgb = to_rgb(image)
    except FileNotFoundError as error:
        raise BadImageError(path, "no such file") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error
    if index.boxes is None:
        return rgb
    left, top, right, bottom = crop_box(index.boxes[i])
    # A box outside the image would be cut as black padding: refused, so it is skipped and counted.
    if min(right, rgb.width) - max(left, 0) < 1 or min(bottom, rgb.height) - max(top, 0) < 1:
        raise BadImageError(path, f"box {tuple(float(v) for v in index.boxes[i])} lies outside the "
                                  f"{rgb.width} x {rgb.height} image")
    return rgb.crop((left, top, right, bottom))


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
