"""Shapes world: procedurally drawn, captioned images for pretraining and testing a tiny CLIP.

Every image holds one shape of one colour, small or large, left / centre / right, on a dark or
light grey background. Shapes are drawn at 4x resolution and averaged down, which anti-aliases
the edges. Everything is deterministic given the seed.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from clip_continual.data.common import ImageSet

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "crescent")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (240, 120, 190),
    "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
BACKGROUNDS = ("dark", "light")

# Captions seen in pretraining. The zero-shot prompt "a photo of a {colour} {shape}" is
# deliberately not among them.
CORPUS_TEMPLATES = (
    "a {size} {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "a {colour} {shape} on the {position}",
    "a {size} {colour} {shape} on a {background} background",
    "{colour} {shape} , {size}",
    "there is a {colour} {shape} in the picture",
    "a {colour} {shape} on a {background} background on the {position}",
    "a picture of a {colour} {shape}",
)
# Retrieval captions name every attribute, so each identifies its own image in the gallery.
RETRIEVAL_TEMPLATES = (
    "a {size} {colour} {shape} on the {position} on a {background} background",
    "a {background} background with a {size} {colour} {shape} on the {position}",
)
ZERO_SHOT_TEMPLATES = ("a photo of a {}",)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeAttributes:
    shape: np.ndarray  # index into SHAPES
    colour: np.ndarray  # index into COLOURS
    size: np.ndarray  # index into SIZES
    position: np.ndarray  # index into POSITIONS
    background: np.ndarray  # index into BACKGROUNDS

    def __len__(self) -> int:
        return len(self.shape)


def concept_names() -> tuple[str, ...]:
    """The 64 colour-shape classes of the zero-shot task; label = colour * 8 + shape."""
    return tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def concept_labels(attributes: ShapeAttributes) -> np.ndarray:
    return (attributes.colour * len(SHAPES) + attributes.shape).astype(np.int64)


def caption_for(attributes: ShapeAttributes, index: int, template: str) -> str:
    return template.format(
        size=SIZES[attributes.size[index]],
        colour=list(COLOURS)[attributes.colour[index]],
        shape=SHAPES[attributes.shape[index]],
        position=POSITIONS[attributes.position[index]],
        background=BACKGROUNDS[attributes.background[index]],
    )


def random_attributes(rng: np.random.Generator, count: int) -> ShapeAttributes:
    return ShapeAttributes(
        shape=rng.integers(0, len(SHAPES), count),
        colour=rng.integers(0, len(COLOURS), count),
        size=rng.integers(0, len(SIZES), count),
        position=rng.integers(0, len(POSITIONS), count),
        background=rng.integers(0, len(BACKGROUNDS), count),
    )


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in shape coordinates (u right, v down, unit = the shape's radius)."""
    rho = np.hypot(u, v)
    if shape == "circle":
        return rho <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.88  # corners well outside the circle
    if shape == "triangle":
        return (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.62)
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        return rho <= 0.42 + 0.58 * ((np.cos(5 * theta) + 1) / 2) ** 2.5
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if shape == "crescent":
        return (rho <= 1.0) & (np.hypot(u - 0.5, v + 0.25) >= 0.8)
    raise ValueError(f"unknown shape '{shape}'")


def supersampled_coverage(inside: np.ndarray) -> np.ndarray:
    """The fraction of each output pixel's SUPERSAMPLE x SUPERSAMPLE samples that are ``inside``
    (bool, N x S*k x S*k) as float32. Counts of 0/1 are exact in any order, so this is bit for bit
    the float32 mean of the samples, in a fraction of its time."""
    count, fine = inside.shape[0], inside.shape[1] // SUPERSAMPLE
    counts = inside.view(np.uint8).reshape(count, fine, SUPERSAMPLE, fine, SUPERSAMPLE)
    counts = counts.sum(axis=4, dtype=np.uint8).sum(axis=2, dtype=np.uint8)
    return counts.astype(np.float32) / np.float32(SUPERSAMPLE * SUPERSAMPLE)


@dataclass(frozen=True)
class _Placement:
    shape: np.ndarray
    radius: np.ndarray
    centre_x: np.ndarray
    centre_y: np.ndarray
    image_size: int

    def coverage(self, part: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage (N x S x S, float32) of the images ``part``; no randomness, so
        chunks can be drawn in any order and on several threads."""
        size = self.image_size
        grid = ((np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32)
        coverage = np.empty((len(part), size, size), dtype=np.float32)
        for shape_index in np.unique(self.shape[part]):
            rows = part[self.shape[part] == shape_index]
            scale = (1.0 / self.radius[rows]).astype(np.float32)[:, None, None]
            u = (grid[None, None, :] - self.centre_x[rows, None, None].astype(np.float32)) * scale
            v = (grid[None, :, None] - self.centre_y[rows, None, None].astype(np.float32)) * scale
            u, v = np.broadcast_arrays(u, v)
            coverage[rows - part[0]] = supersampled_coverage(_shape_mask(SHAPES[shape_index], u, v))
        return coverage


def _placement(attributes: ShapeAttributes, rng: np.random.Generator, image_size: int) -> _Placement:
    # Sizes and offsets as fractions of the image, so any resolution draws the same scene.
    count = len(attributes)
    radius = image_size * np.where(
        attributes.size == 0, rng.uniform(0.25, 0.3, count), rng.uniform(0.36, 0.44, count)
    )
    column = image_size * np.array([0.25, 0.5, 0.75])[attributes.position]
    jitter = image_size * 0.05
    centre_x = np.clip(column + rng.uniform(-jitter, jitter, count), radius, image_size - radius)
    centre_y = np.clip(image_size / 2 + rng.uniform(-jitter, jitter, count), radius, image_size - radius)
    return _Placement(attributes.shape, radius, centre_x, centre_y, image_size)


def draw(attributes: ShapeAttributes, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """Draw the images (uint8, N x S x S x 3) for the given attributes."""
    count = len(attributes)
    placement = _placement(attributes, rng, image_size)
    grey = np.where(attributes.background == 0, rng.uniform(25, 85, count), rng.uniform(165, 225, count))
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    colour = np.clip(palette[attributes.colour] + rng.normal(0, 10, (count, 3)), 0, 255)

    def noiseless(part: np.ndarray) -> np.ndarray:
        background = grey[part, None, None, None]
        return background + placement.coverage(part)[..., None] * (colour[part, None, None, :] - background)

    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    parts = [np.arange(start, min(start + 512, count)) for start in range(0, count, 512)]
    # Most of the work on every core (numpy releases the GIL); the noise is drawn chunk after
    # chunk in order, so the images do not depend on the number of threads.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for part, pixels in zip(parts, _in_order(pool, noiseless, parts, ahead=2 * workers)):
            pixels += rng.normal(0, 3.0, pixels.shape)  # sensor noise, so no two images are identical
            images[part] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images


def _in_order(pool: ThreadPoolExecutor, function: Callable[[Any], Any], items: list[Any],
              ahead: int) -> Iterator[Any]:
    """``function`` of each item, in order, with at most ``ahead`` results computed but not yet
    taken (``pool.map`` would hold every chunk's float pixels at once on a large corpus)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def make_corpus(count: int, seed: int, image_size: int = 32, stream: int = 0) -> ImageSet:
    """Image-caption pairs for contrastive pretraining (one caption per image, template at random).
    ``stream`` picks an independent random stream (0: the pretraining corpus)."""
    rng = np.random.default_rng([seed, stream])
    attributes = random_attributes(rng, count)
    templates = rng.integers(0, len(CORPUS_TEMPLATES), count)
    captions = np.array(
        [[caption_for(attributes, i, CORPUS_TEMPLATES[t])] for i, t in enumerate(templates)]
    )
    return ImageSet(
        images=draw(attributes, rng, image_size),
        labels=concept_labels(attributes),
        class_names=concept_names(),
        captions=captions,
    )


REFERENCE_STREAM = 3  # apart from the corpus (0), zero-shot (1) and retrieval (2) streams


def make_reference_set(count: int, seed: int, image_size: int = 32) -> ImageSet:
    """Held-back image-caption pairs drawn like the pretraining corpus but never trained on: the
    replay / reference set of methods that rehearse the pretraining distribution (A-GEM, GEM,
    ZSCL's reference images and texts)."""
    return make_corpus(count, seed, image_size, stream=REFERENCE_STREAM)


def make_zero_shot_set(per_class: int, seed: int, image_size: int = 32) -> ImageSet:
    """Fresh images, balanced over the 64 colour-shape concepts."""
    rng = np.random.default_rng([seed, 1])
    classes = np.repeat(np.arange(len(COLOURS) * len(SHAPES)), per_class)
    rng.shuffle(classes)
    count = len(classes)
    attributes = ShapeAttributes(
        shape=classes % len(SHAPES),
        colour=classes // len(SHAPES),
        size=rng.integers(0, len(SIZES), count),
        position=rng.integers(0, len(POSITIONS), count),
        background=rng.integers(0, len(BACKGROUNDS), count),
    )
    return ImageSet(
        images=draw(attributes, rng, image_size),
        labels=concept_labels(attributes),
        class_names=concept_names(),
    )


def make_retrieval_set(count: int, seed: int, image_size: int = 32) -> ImageSet:
    """A gallery in which every image has a distinct attribute combination, hence distinct captions."""
    combinations = len(SHAPES) * len(COLOURS) * len(SIZES) * len(POSITIONS) * len(BACKGROUNDS)
    if not 0 < count <= combinations:
        raise ValueError(f"a retrieval gallery holds 1 to {combinations} images, got {count}")
    rng = np.random.default_rng([seed, 2])
    codes = rng.choice(combinations, size=count, replace=False)
    shape, rest = codes % len(SHAPES), codes // len(SHAPES)
    colour, rest = rest % len(COLOURS), rest // len(COLOURS)
    size, rest = rest % len(SIZES), rest // len(SIZES)
    position, background = rest % len(POSITIONS), rest // len(POSITIONS)
    attributes = ShapeAttributes(shape, colour, size, position, background)
    captions = np.array(
        [[caption_for(attributes, i, template) for template in RETRIEVAL_TEMPLATES] for i in range(count)]
    )
    return ImageSet(
        images=draw(attributes, rng, image_size),
        labels=concept_labels(attributes),
        class_names=concept_names(),
        captions=captions,
    )
