"""Printed digits: drawn numerals with captions that name them, mixed into the pretraining corpus.

A real CLIP has read the word "three" beside many pictures of printed threes, but not beside the
handwritten scans of a continual task. These glyphs put the tiny CLIP in the same place: it
learns the ten digit words from drawn strokes (coloured ink on grey, any slant, size and
thickness), and meets the handwritten digits of the updated task (white ink on black, blurred
8x8 scans) only in the continual sessions. Its zero-shot accuracy on them is therefore above
chance but far from solved, as CLIP's is on a new domain.

Strokes are drawn at 4x resolution with Pillow and averaged down (anti-aliased). Everything is
deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from clip_continual.data.common import ImageSet
from clip_continual.data.digits import DIGIT_NAMES, upscale
from clip_continual.data.shapes import BACKGROUNDS, COLOURS, SIZES

SUPERSAMPLE = 4

# Captions seen in pretraining; the digits' zero-shot prompt ("a photo of the digit {}") is not
# among them.
GLYPH_TEMPLATES = (
    "the digit {word}",
    "a {colour} {word} on a {background} background",
    "the number {word}",
    "a drawing of the number {word}",
    "{word} written in {colour}",
    "a {size} {colour} digit {word}",
)


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, points: int = 16
         ) -> list[tuple[float, float]]:
    """Points of an elliptic arc in the unit box (y down; 270 degrees is the top)."""
    angles = np.radians(np.linspace(start, end, points))
    return list(zip(cx + rx * np.cos(angles), cy + ry * np.sin(angles)))


# Each numeral as polylines in the unit box (x right, y down).
STROKES: tuple[tuple[list[tuple[float, float]], ...], ...] = (
    (_arc(0.5, 0.5, 0.3, 0.42, 0, 360, 32),),
    ([(0.33, 0.25), (0.55, 0.08), (0.55, 0.92)],),
    (_arc(0.5, 0.32, 0.28, 0.24, 190, 400) + [(0.2, 0.92), (0.82, 0.92)],),
    (_arc(0.5, 0.29, 0.26, 0.21, 200, 450), _arc(0.5, 0.7, 0.3, 0.22, 270, 520)),
    ([(0.65, 0.92), (0.65, 0.08), (0.15, 0.65), (0.85, 0.65)],),
    ([(0.78, 0.08), (0.3, 0.08), (0.28, 0.47)] + _arc(0.5, 0.66, 0.3, 0.26, 225, 520),),
    (_arc(0.75, 0.7, 0.5, 0.62, 250, 180, 10) + _arc(0.5, 0.69, 0.25, 0.23, 180, 540, 24),),
    ([(0.18, 0.08), (0.82, 0.08), (0.4, 0.92)],),
    (_arc(0.5, 0.28, 0.22, 0.2, 0, 360, 24), _arc(0.5, 0.7, 0.28, 0.22, 0, 360, 24)),
    (_arc(0.5, 0.31, 0.26, 0.23, 0, 360, 24), [(0.76, 0.31), (0.68, 0.92)]),
)


def _placed(strokes: tuple[list[tuple[float, float]], ...], rng: np.random.Generator, fine: int,
            height: float) -> list[list[tuple[float, float]]]:
    """The strokes slanted, scaled to ``height`` (fraction of the image) and placed at random."""
    slant = rng.uniform(-0.3, 0.3)
    width = height * rng.uniform(0.6, 0.8)
    left = rng.uniform(0.05, max(0.05, 0.95 - width))
    top = rng.uniform(0.02, max(0.02, 0.98 - height))
    return [[(fine * (left + width * (x + slant * (0.5 - y))), fine * (top + height * y))
             for x, y in line] for line in strokes]


def block_means(image: np.ndarray, block: int, dtype: type) -> np.ndarray:
    """Means of ``block`` x ``block`` squares of a uint8 (H x W [x C]) image, in ``dtype``. The
    sums are whole numbers far below 2**24, exact in any order, so this is bit for bit numpy's
    mean in that dtype, without its cost on small arrays."""
    rows, columns = image.shape[0] // block, image.shape[1] // block
    squares = image.reshape(rows, block, columns, block, *image.shape[2:]).astype(np.int32)
    return squares.sum(axis=(1, 3)).astype(dtype) / dtype(block * block)


def draw_glyph(digit: int, ink: tuple[float, ...], paper: float, height: float, thickness: float,
               rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One numeral (uint8, S x S x 3): ``ink`` RGB on a grey ``paper``; ``thickness`` in pixels."""
    fine = image_size * SUPERSAMPLE
    canvas = Image.new("L", (fine, fine), 0)
    pen = ImageDraw.Draw(canvas)
    stroke = max(1, int(round(thickness * SUPERSAMPLE)))
    for line in _placed(STROKES[digit], rng, fine, height):
        pen.line(line, fill=255, width=stroke, joint="curve")
    coverage = block_means(np.asarray(canvas), SUPERSAMPLE, np.float32) / 255.0
    pixels = paper + coverage[..., None] * (np.asarray(ink, dtype=np.float32) - paper)
    pixels += rng.normal(0, 3.0, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def scanned(image: np.ndarray) -> np.ndarray:
    """The look of a low-resolution scan: reduced to 8x8 by area, enlarged back bilinearly
    (as the handwritten digits of the updated task are stored)."""
    size = image.shape[0]
    coarse = block_means(image, size // 8, np.float64) / 16.0
    return upscale(coarse[..., 0][None], size)[0]


def make_glyphs(count: int, seed: int, image_size: int = 32, scanned_fraction: float = 0.0,
                stream: int = 5) -> ImageSet:
    """``count`` captioned printed numerals (label = the digit), from their own random stream; a
    ``scanned_fraction`` of them white on black, thick and scanned at 8x8."""
    rng = np.random.default_rng([seed, stream])
    digits = rng.integers(0, len(DIGIT_NAMES), count)
    colours = rng.integers(0, len(COLOURS), count)
    sizes = rng.integers(0, len(SIZES), count)
    backgrounds = rng.integers(0, len(BACKGROUNDS), count)
    templates = rng.integers(0, len(GLYPH_TEMPLATES), count)
    scans = rng.random(count) < scanned_fraction
    palette = list(COLOURS.items())
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        if scans[i]:
            colour, background = "white", "dark"
            images[i] = scanned(draw_glyph(int(digits[i]), (255, 255, 255), 0.0, rng.uniform(0.75, 0.95),
                                           rng.uniform(2.5, 4.5), rng, image_size))
        else:
            colour, background = palette[colours[i]][0], BACKGROUNDS[backgrounds[i]]
            paper = rng.uniform(25, 85) if backgrounds[i] == 0 else rng.uniform(165, 225)
            height = rng.uniform(0.45, 0.6) if sizes[i] == 0 else rng.uniform(0.7, 0.88)
            images[i] = draw_glyph(int(digits[i]), palette[colours[i]][1], paper, height,
                                   rng.uniform(1.2, 3.0), rng, image_size)
        captions.append([GLYPH_TEMPLATES[templates[i]].format(
            word=DIGIT_NAMES[digits[i]], colour=colour, size=SIZES[sizes[i]], background=background)])
    return ImageSet(images=images, labels=digits.astype(np.int64), class_names=DIGIT_NAMES,
                    captions=np.array(captions))


def mixed_corpus(shapes: ImageSet, glyphs: ImageSet, seed: int) -> ImageSet:
    """The pretraining corpus: shapes and printed numerals shuffled together (labels of the
    numerals follow the shapes' classes)."""
    order = np.random.default_rng([seed, 6]).permutation(len(shapes) + len(glyphs))
    return ImageSet(
        images=np.concatenate([shapes.images, glyphs.images])[order],
        labels=np.concatenate([shapes.labels, glyphs.labels + len(shapes.class_names)])[order],
        class_names=tuple(shapes.class_names) + tuple(f"digit {name}" for name in glyphs.class_names),
        captions=np.concatenate([shapes.captions, glyphs.captions])[order],
    )
