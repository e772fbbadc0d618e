"""Shapes world: procedurally drawn, captioned images for pretraining and testing a tiny CLIP.

Every image holds one shape of one colour, small or large, left / centre / right, on a dark or
light grey background. Shapes are drawn at 4x resolution and averaged down, which anti-aliases
the edges. Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def draw(attributes: ShapeAttributes, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """Draw the images (uint8, N x S x S x 3) for the given attributes."""
    count = len(attributes)
    fine = image_size * SUPERSAMPLE
    # Pixel centres in output-pixel units.
    grid = (np.arange(fine) + 0.5) / SUPERSAMPLE
    # Sizes and offsets as fractions of the image, so any resolution draws the same scene.
    radius = image_size * np.where(
        attributes.size == 0, rng.uniform(0.25, 0.3, count), rng.uniform(0.36, 0.44, count)
    )
    column = image_size * np.array([0.25, 0.5, 0.75])[attributes.position]
    jitter = image_size * 0.05
    centre_x = np.clip(column + rng.uniform(-jitter, jitter, count), radius, image_size - radius)
    centre_y = np.clip(image_size / 2 + rng.uniform(-jitter, jitter, count), radius, image_size - radius)
    grey = np.where(attributes.background == 0, rng.uniform(25, 85, count), rng.uniform(165, 225, count))
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    colour = np.clip(palette[attributes.colour] + rng.normal(0, 10, (count, 3)), 0, 255)

    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    grid = grid.astype(np.float32)
    chunk = 512
    for start in range(0, count, chunk):
        part = np.arange(start, min(start + chunk, count))
        coverage = np.empty((len(part), image_size, image_size), dtype=np.float32)
        for shape_index in np.unique(attributes.shape[part]):
            rows = part[attributes.shape[part] == shape_index]
            scale = (1.0 / radius[rows]).astype(np.float32)[:, None, None]
            u = (grid[None, None, :] - centre_x[rows, None, None].astype(np.float32)) * scale
            v = (grid[None, :, None] - centre_y[rows, None, None].astype(np.float32)) * scale
            u, v = np.broadcast_arrays(u, v)
            mask = _shape_mask(SHAPES[shape_index], u, v).astype(np.float32)
            coverage[rows - start] = mask.reshape(
                len(rows), image_size, SUPERSAMPLE, image_size, SUPERSAMPLE
            ).mean(axis=(2, 4))
        background = grey[part, None, None, None]
        pixels = background + coverage[..., None] * (colour[part, None, None, :] - background)
        pixels += rng.normal(0, 3.0, pixels.shape)  # sensor noise, so no two images are identical
        images[part] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images


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
