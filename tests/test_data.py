import numpy as np
import pytest

from clip_continual.data.common import DataFormatError, ImageSet
from clip_continual.data.digits import DIGIT_NAMES, make_digits
from clip_continual.data.shapes import (
    COLOURS,
    CORPUS_TEMPLATES,
    SHAPES,
    ZERO_SHOT_TEMPLATES,
    concept_names,
    make_corpus,
    make_retrieval_set,
    make_zero_shot_set,
)


def test_shapes_are_deterministic_from_the_seed():
    a, b, c = make_corpus(64, seed=1), make_corpus(64, seed=1), make_corpus(64, seed=2)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.captions, b.captions)
    assert not np.array_equal(a.images, c.images)


def test_corpus_captions_agree_with_labels():
    corpus = make_corpus(300, seed=0)
    names = concept_names()
    for label, (caption,) in zip(corpus.labels, corpus.captions):
        colour, shape = names[label].split()
        words = caption.split()
        assert colour in words and shape in words, caption
        # exactly one colour and one shape word per caption
        assert sum(w in COLOURS for w in words) == 1 and sum(w in SHAPES for w in words) == 1


def test_zero_shot_prompt_is_never_a_training_caption():
    prompt = ZERO_SHOT_TEMPLATES[0].replace("{}", "{colour} {shape}")
    assert prompt not in CORPUS_TEMPLATES


def test_shape_pixels_take_the_named_colour():
    zs = make_zero_shot_set(per_class=3, seed=0)
    palette = np.array(list(COLOURS.values()), dtype=float)
    for image, label in zip(zs.images, zs.labels):
        pixels = image.reshape(-1, 3).astype(float)
        # Shapes stay inside the image, so its corners show the background.
        background = np.median(image[[0, 0, -1, -1], [0, -1, 0, -1]].astype(float), axis=0)
        far = pixels[np.abs(pixels - background).sum(axis=1) > 60]
        assert len(far) > 5, "a shape must cover some pixels"
        nearest = np.argmin(((far.mean(axis=0)[None] - palette) ** 2).sum(axis=1))
        assert nearest == label // len(SHAPES)


def test_image_statistics_are_plausible():
    corpus = make_corpus(500, seed=0)
    assert corpus.images.dtype == np.uint8 and corpus.images.shape == (500, 32, 32, 3)
    assert 40 < corpus.images.mean() < 200 and corpus.images.std() > 30
    backgrounds = corpus.images[:, 0, 0].mean(axis=1)
    assert (backgrounds < 100).mean() > 0.3 and (backgrounds > 150).mean() > 0.3


def test_zero_shot_set_is_balanced():
    zs = make_zero_shot_set(per_class=4, seed=0)
    assert len(zs.class_names) == 64
    assert np.all(np.bincount(zs.labels, minlength=64) == 4)


def test_retrieval_captions_are_unique_and_name_their_image():
    gallery = make_retrieval_set(200, seed=0)
    assert gallery.captions.shape == (200, 2)
    assert len(set(gallery.captions.ravel())) == 400
    names = concept_names()
    for label, captions in zip(gallery.labels, gallery.captions):
        for caption in captions:
            assert all(word in caption.split() for word in names[label].split())


def test_retrieval_set_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="1 to 768"):
        make_retrieval_set(10_000, seed=0)


def test_digits_split_sizes_and_stratification():
    train, test = make_digits(test_fraction=0.3, seed=0, image_size=32)
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.3) < 0.01
    assert train.class_names == DIGIT_NAMES
    train_share = np.bincount(train.labels) / len(train)
    test_share = np.bincount(test.labels) / len(test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert train.images.shape[1:] == (32, 32, 3) and train.images.max() > 200


def test_digits_reject_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        make_digits(test_fraction=1.5, seed=0)


def test_image_set_validates_shapes_and_round_trips():
    with pytest.raises(DataFormatError, match="uint8"):
        ImageSet(np.zeros((2, 4, 4, 3), dtype=np.float32), np.zeros(2, dtype=np.int64), ("a",))
    with pytest.raises(DataFormatError, match="labels must lie"):
        ImageSet(np.zeros((2, 4, 4, 3), dtype=np.uint8), np.array([0, 3]), ("a", "b"))
    gallery = make_retrieval_set(5, seed=0)
    again = ImageSet.from_arrays(gallery.to_arrays())
    assert np.array_equal(again.images, gallery.images)
    assert again.class_names == gallery.class_names
    assert np.array_equal(again.captions, gallery.captions)


def test_printed_digits_name_their_numeral_and_never_use_the_zero_shot_prompt():
    from clip_continual.data.digits import DIGIT_PROMPT
    from clip_continual.data.glyphs import GLYPH_TEMPLATES, make_glyphs

    glyphs, again = make_glyphs(60, seed=3), make_glyphs(60, seed=3)
    assert np.array_equal(glyphs.images, again.images) and np.array_equal(glyphs.captions, again.captions)
    for label, (caption,) in zip(glyphs.labels, glyphs.captions):
        words = caption.split()
        assert sum(word in DIGIT_NAMES for word in words) == 1 and DIGIT_NAMES[label] in words, caption
    assert DIGIT_PROMPT.replace("{}", "{word}") not in GLYPH_TEMPLATES


def test_printed_digits_draw_ink_that_differs_between_numerals():
    from clip_continual.data.glyphs import draw_glyph

    def ink(digit: int) -> np.ndarray:  # the same placement for every numeral
        image = draw_glyph(digit, (255, 255, 255), 0.0, 0.8, 2.0, np.random.default_rng(0), 32)
        return image[..., 0].astype(float) / 255

    inks = [ink(digit) for digit in range(10)]
    assert all(0.05 < image.mean() < 0.5 for image in inks)  # strokes cover part of the image
    distances = [np.abs(a - b).mean() for i, a in enumerate(inks) for b in inks[i + 1:]]
    assert min(distances) > 0.02  # no two numerals drawn alike


def test_the_pretraining_corpus_mixes_printed_digits_in():
    from clip_continual.pipelines.data_preparation.nodes import generate_pretraining_corpus

    params = {"image_size": 32, "shapes": {"corpus_size": 200}, "glyphs": {"count": 30}}
    corpus = generate_pretraining_corpus(params, seed=0)
    assert len(corpus) == 200 and len(corpus.class_names) == 64 + 10
    assert (corpus.labels >= 64).sum() == 30
    assert not (corpus.labels[:30] >= 64).all()  # shuffled, not appended
    with pytest.raises(ValueError, match="glyphs.count"):
        generate_pretraining_corpus({**params, "glyphs": {"count": 201}}, seed=0)


def test_printed_digits_are_part_of_the_start_model_key():
    """A corpus with other printed digits pretrains another start model: never reuse one."""
    from clip_continual.runtime.run_key import compute_source_key

    params = {"model": {"architecture": "clip-continual-tiny-p8"}, "seed": 0, "pretraining": {"steps": 10},
              "data_preparation": {"image_size": 32, "shapes": {"corpus_size": 200}}}
    keys = {compute_source_key({**params, "data_preparation": {**params["data_preparation"], "glyphs": glyphs}})
            for glyphs in ({"count": 30}, {"count": 40}, {"count": 30, "scanned_fraction": 0.5})}
    assert len(keys) == 3
    off = {**params["data_preparation"], "glyphs": {"count": 0}}
    assert compute_source_key({**params, "data_preparation": off}) == compute_source_key(params)


def test_coverage_counts_are_the_float_mean_of_the_samples_bit_for_bit():
    """The drawing's fast anti-aliasing (integer counts, several threads) gives exactly the
    numbers of the plain float means it replaced, so a seed draws the same images as before."""
    from clip_continual.data.glyphs import block_means
    from clip_continual.data.shapes import SUPERSAMPLE, supersampled_coverage

    rng = np.random.default_rng(0)
    inside = rng.random((5, 8 * SUPERSAMPLE, 8 * SUPERSAMPLE)) < 0.4
    plain = inside.astype(np.float32).reshape(5, 8, SUPERSAMPLE, 8, SUPERSAMPLE).mean(axis=(2, 4))
    assert supersampled_coverage(inside).dtype == np.float32
    assert np.array_equal(supersampled_coverage(inside), plain)
    canvas = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    assert np.array_equal(block_means(canvas, 4, np.float32),
                          canvas.astype(np.float32).reshape(8, 4, 8, 4).mean(axis=(1, 3)))
    scan = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(block_means(scan, 4, np.float64), scan.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)))
