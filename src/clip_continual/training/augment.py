"""Augmentation of in-memory training images on the device, drawn per global batch from a
generator of the step, so a data-parallel replica augments its part exactly as a one-process run
does. (Lazy sets are augmented by the DataLoader workers: ``data/loading.py``.)

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import numpy as np
import torch

from clip_continual.data.loading import random_resized_box
from clip_continual.model.clip import ClipModel, preprocess_images

CROP_RESIZE_RATIO = 256 / 224  # the paper's train transform: resize 256, random crop 224
AUGMENT_STREAM = 3  # keeps augmentation randomness apart from the vocabulary's streams


def augment_crop_flip(
    images: np.ndarray, clip: ClipModel, generator: torch.Generator, device: torch.device,
    part: slice | None = None, global_count: int | None = None,
) -> torch.Tensor:
    """The paper's train transform at the model's resolution S: resize to S * 256/224, random
    S x S crop, random horizontal flip (per image, from ``generator``). When ``images`` are
    ``part`` of a global batch of ``global_count`` images, the draws are the global batch's, so
    every image gets the crop it gets in a one-process run."""
    size = clip.image_size
    resized = max(size, round(size * CROP_RESIZE_RATIO))
    big = preprocess_images(images, resized, clip.image_mean, clip.image_std, device)
    count = len(images) if global_count is None else global_count
    part = part or slice(0, count)
    offsets = torch.randint(0, resized - size + 1, (count, 2), generator=generator)[part].tolist()
    flips = (torch.rand(count, generator=generator) < 0.5)[part].tolist()
    crops = []
    for image, (top, left), flip in zip(big, offsets, flips):
        crop = image[:, top : top + size, left : left + size]
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)


def augment_zscl(
    images: np.ndarray, clip: ClipModel, generator: torch.Generator, device: torch.device,
    part: slice | None = None, global_count: int | None = None,
) -> torch.Tensor:
    """ZSCL's train transform (mtil/clip/clip.py ``_transform(n_px, is_train=True)``):
    RandomResizedCrop(S, scale=(0.9, 1.0), bicubic), per image, drawn from ``generator``.
    Each image's box comes from its position in the global batch (``part`` of ``global_count``
    images), so a data-parallel replica crops every image as a one-process run does."""
    size = clip.image_size
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    positions = range(len(images) if global_count is None else global_count)[part or slice(None)]
    crops = []
    for image, position in zip(images, positions):
        rng = np.random.default_rng((base, position))
        top, left, height, width = random_resized_box(image.shape[0], image.shape[1], rng)
        crops.append(image[top:top + height, left:left + width])
    return torch.cat([preprocess_images(crop[None], size, clip.image_mean, clip.image_std, device)
                      for crop in crops])
