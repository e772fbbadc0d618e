"""Nodes that generate the embedded default's data (no download)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clip_continual.data.common import ImageSet
from clip_continual.data.digits import make_digits
from clip_continual.data.glyphs import make_glyphs, mixed_corpus
from clip_continual.data.shapes import (
    make_corpus, make_reference_set, make_retrieval_set, make_zero_shot_set,
)


def generate_pretraining_corpus(params: dict[str, Any], seed: int) -> ImageSet:
    """``corpus_size`` pairs: printed digits (``glyphs.count``) among shapes-world pairs."""
    glyph_params = params.get("glyphs") or {}
    total, glyphs = params["shapes"]["corpus_size"], glyph_params.get("count", 0)
    if not 0 <= glyphs <= total:
        raise ValueError(f"data_preparation.glyphs.count must lie in [0, corpus_size={total}], got {glyphs}")
    if not glyphs:
        return make_corpus(total, seed, params["image_size"])
    # Two random streams of their own: drawn side by side, they give the same images as in turn.
    with ThreadPoolExecutor(1) as pool:
        printed = pool.submit(make_glyphs, glyphs, seed, params["image_size"],
                              glyph_params.get("scanned_fraction", 0.0))
        shapes = make_corpus(total - glyphs, seed, params["image_size"])
        return mixed_corpus(shapes, printed.result(), seed)


def generate_shapes_zero_shot_set(params: dict[str, Any], seed: int) -> ImageSet:
    return make_zero_shot_set(params["shapes"]["zero_shot_per_class"], seed, params["image_size"])


def generate_shapes_retrieval_set(params: dict[str, Any], seed: int) -> ImageSet:
    return make_retrieval_set(params["shapes"]["retrieval_size"], seed, params["image_size"])


def generate_shapes_reference_set(params: dict[str, Any], seed: int) -> ImageSet:
    return make_reference_set(params["shapes"]["reference_size"], seed, params["image_size"])


def prepare_digits(params: dict[str, Any], seed: int) -> tuple[ImageSet, ImageSet]:
    return make_digits(params["digits"]["test_fraction"], seed, params["image_size"])
