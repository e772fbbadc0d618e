"""Reference sets of the named benchmarks, read from the files users download (LAION pairs as
img2dataset writes them, ImageNet-style image folders, Conceptual Captions TSV and gather_cc
output), and the one error a missing path gives. The run of agem through a benchmark pipeline is
folded into tests/test_benchmark_pipelines.py."""

from __future__ import annotations

import numpy as np
import pytest

from clip_continual.data.raw_files import MissingInputError
from clip_continual.data.reference import (
    ReferenceConfigError, ReferenceSettings, decode_reference, reference_source,
)
from clip_continual.pipelines.benchmark_data.nodes import check_reference
from realdata_fixtures import (
    reference_caption, write_conceptual_captions_tsv, write_gather_cc, write_image_folder, write_img2dataset_pairs,
)


def test_img2dataset_pairs_are_sampled_once_and_decoded_at_the_model_resolution(tmp_path):
    captions = write_img2dataset_pairs(tmp_path / "laion", 10)
    params = {"pairs": str(tmp_path / "laion"), "size": 6, "seed": 3}
    settings = ReferenceSettings.from_params(params, "coco_mst.reference")
    source = reference_source(settings, "agem", paired=True)
    again = reference_source(settings, "agem", paired=True)
    assert len(source.index) == 6 and source.index.paths == again.index.paths  # a pure function of the seed

    reference = decode_reference(source, image_size=16)
    assert reference.images.shape == (6, 16, 16, 3) and reference.captions.shape == (6, 1)
    numbers = [int(p.split("/")[-1].split(".")[0]) for p in source.index.paths]
    assert list(reference.captions[:, 0]) == [captions[n] for n in numbers]  # each image keeps its caption


def test_zscl_reads_image_folder_images_and_every_conceptual_caption(tmp_path):
    write_image_folder(tmp_path / "imagenet" / "train", {"n01": 3, "n02": 2})
    captions = write_conceptual_captions_tsv(tmp_path / "cc" / "Validation_GCC-1.1.0-Validation.tsv", 7)
    params = {"pairs": None, "images": str(tmp_path / "imagenet" / "train"),
              "captions": str(tmp_path / "cc" / "Validation_GCC-1.1.0-Validation.tsv"), "size": 4}
    reference = decode_reference(check_reference(params, "zscl", "mtil_order1.reference"), image_size=8)
    assert reference.images.shape == (4, 8, 8, 3)
    assert reference.class_names == ("n01", "n02")
    kept = [c for c in reference.captions.reshape(-1) if c]
    assert sorted(kept) == sorted(captions)  # all 7 captions, none twice, spread over 4 images
    fewer = check_reference({**params, "captions_size": 5}, "zscl", "mtil_order1.reference").captions
    assert len(set(fewer)) == 5 and set(fewer) <= set(captions)


def test_gather_cc_output_gives_conceptual_captions_pairs(tmp_path):
    csv = write_gather_cc(tmp_path, 3)
    reference = decode_reference(check_reference({"pairs": str(csv)}, "gem", "cifar100_10steps.reference"), 8)
    assert list(reference.captions[:, 0]) == [reference_caption(n) for n in range(3)]
    assert reference.images[0, 4, 4].tolist() != reference.images[1, 4, 4].tolist()  # the files' own pixels


def test_a_missing_reference_names_the_parameter_only_when_the_method_needs_one(tmp_path):
    params = {"pairs": str(tmp_path / "laion_subset"), "images": None, "captions": None}
    with pytest.raises(MissingInputError, match=r"coco_mst\.reference\.pairs: nothing at .*laion_subset.*img2dataset"):
        check_reference(params, "zscl", "coco_mst.reference")
    paired = r"'agem' replays image-caption pairs and mtil_order1\.reference\.pairs is null: set mtil_order1\.reference\.pairs to"
    with pytest.raises(ReferenceConfigError, match=paired):
        check_reference({"pairs": None, "images": "x", "captions": "y"}, "agem", "mtil_order1.reference")
    with pytest.raises(ReferenceConfigError, match=r"set mtil_order1\.reference\.pairs, or mtil_order1\.reference\.images and"):
        check_reference({"pairs": None, "images": None, "captions": None}, "zscl", "mtil_order1.reference")
    unpaired = {"pairs": None, "images": str(tmp_path / "imagenet" / "train"), "captions": "x.tsv"}
    with pytest.raises(MissingInputError, match=r"mtil_order1\.reference\.images: expected a folder .* ImageNet's train"):
        check_reference(unpaired, "zscl", "mtil_order1.reference")
    for method in ("ft", "vr_lwf"):
        assert check_reference(params, method, "coco_mst.reference").index is None
    empty = decode_reference(check_reference(params, "ft", "coco_mst.reference"), 16)
    assert empty.images.shape == (0, 16, 16, 3)
    np.testing.assert_array_equal(empty.labels, np.zeros(0))


def test_size_null_streams_every_image_of_the_folder_for_zscl(tmp_path, micro):
    """ZSCL draws each step's reference batch from the whole folder: a seeded order that shows
    every image once per pass, decoded by the loader's workers; zscl trains on it."""
    import torch

    from clip_continual.data.reference import ReferenceStream
    from clip_continual.methods import get_method
    from clip_continual.methods.base import Batch, TaskContext

    write_image_folder(tmp_path / "imagenet" / "train", {"n01": 4, "n02": 3})
    write_conceptual_captions_tsv(tmp_path / "cc.tsv", 3)
    params = {"pairs": None, "images": str(tmp_path / "imagenet" / "train"), "captions": str(tmp_path / "cc.tsv"),
              "size": None}
    stream = decode_reference(check_reference(params, "zscl", "mtil_order1.reference"), micro.image_size)
    assert isinstance(stream, ReferenceStream) and len(stream) == 7
    one_pass = np.concatenate([stream.step_rows(5, step, 2) for step in (0, 1, 2)])
    assert sorted(one_pass.tolist()) == sorted(set(one_pass.tolist())) and len(one_pass) == 6  # no repeats
    assert stream.step_rows(5, 2, 2).tolist() == stream.step_rows(5, 2, 2).tolist()  # a function of the step
    step, rows, images = next(stream.batches(5, 2, first_step=2))
    assert step == 2 and rows.tolist() == stream.step_rows(5, 2, 2).tolist()
    assert images.shape == (2, micro.image_size, micro.image_size, 3) and images.dtype == np.uint8
    # A paired method keeps its pairs in memory whatever the size.
    assert not check_reference({**params, "pairs": None}, "ft", "x").stream

    method, student = get_method("zscl"), micro.clone()
    method.prepare_student(student.model, "wm")
    task = TaskContext(task_index=1, device=torch.device("cpu"), class_tokens=student.tokenize(["a", "b"]),
                       current_classes=torch.arange(2), seen_classes=torch.arange(2),
                       preprocess=lambda x: student.preprocess(x, "cpu"), tokenize=student.tokenize,
                       extras={"reference_set": stream, "pretrained_model": micro})
    method.before_task(task)
    pixels = student.preprocess(images, "cpu")
    batch = Batch(step=0, indices=torch.arange(2), labels=torch.tensor([0, 1]), pixels=pixels)
    terms = method.loss_terms(student.model, batch, task)
    assert {"zscl_image", "zscl_text"} <= set(terms) and all(torch.isfinite(t) for t in terms.values())
