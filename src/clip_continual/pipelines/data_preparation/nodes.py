"""Nodes that generate the embedded default's data (no download)."""

from __future__ import annotations

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
    shapes = make_corpus(total - glyphs, seed, params["image_size"])
    if not glyphs:
        return shapes
    printed = make_glyphs(glyphs, seed, params["image_size"], glyph_params.get("scanned_fraction", 0.0))
    return mixed_corpus(shapes, printed, seed)


def generate_shapes_zero_shot_set(params: dict[str, Any], seed: int) -> ImageSet:
    return make_zero_shot_set(params["shapes"]["zero_shot_per_class"], seed, params["image_size"])


def generate_shapes_retrieval_set(params: dict[str, Any], seed: int) -> ImageSet:
    return make_retrieval_set(params["shapes"]["retrieval_size"], seed, params["image_size"])


def generate_shapes_reference_set(params: dict[str, Any], seed: int) -> ImageSet:
    return make_reference_set(params["shapes"]["reference_size"], seed, params["image_size"])


def prepare_digits(params: dict[str, Any], seed: int) -> tuple[ImageSet, ImageSet]:
    return make_digits(params["digits"]["test_fraction"], seed, params["image_size"])
