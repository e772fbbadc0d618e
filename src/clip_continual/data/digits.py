"""The handwritten digits bundled with scikit-learn, as the embedded default's updated task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from clip_continual.data.common import ImageSet

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PROMPT = "a photo of the digit {}"


def upscale(images_8x8: np.ndarray, image_size: int) -> np.ndarray:
    """sklearn's 8x8 digits (0..16) -> uint8 RGB, white ink on black, upscaled bilinearly."""
    x = torch.from_numpy(images_8x8.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    gray = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return np.repeat(gray[..., None], 3, axis=-1)


def make_digits(test_fraction: float, seed: int, image_size: int = 32) -> tuple[ImageSet, ImageSet]:
    """Train and test sets, split stratified by class."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    digits = load_digits()
    images = upscale(digits.images, image_size)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    full = ImageSet(images=images, labels=labels, class_names=DIGIT_NAMES)
    return full.subset(np.sort(train_idx)), full.subset(np.sort(test_idx))
