"""Prepared splits (WebDataset shards written once, atomically) and the DataLoader path."""

from __future__ import annotations

import json
import tarfile

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from clip_continual.data.index import ImageIndex
from clip_continual.data.loading import (
    LoaderConfig, LoaderConfigError, StreamedImages, eval_transform, train_transform, training_source,
)
from clip_continual.data.shards import (
    PreparedSplit, ShardRequest, ShardSettings, TooManyBadImages, prepare_split, read_manifest,
)
from clip_continual.io import PreparedSplitDataset
from realdata_fixtures import write_truncated_jpeg


def _index(root, count=6, size=(300, 40), captions=False, noise=False) -> ImageIndex:
    """``count`` images of distinct colours (with ``noise``: random pixels), each cropped to its
    left 200 x 40 pixels."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(count):
        image = (rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise
                 else np.full((size[1], size[0], 3), (40 * i, 255 - 40 * i, 100), dtype=np.uint8))
        Image.fromarray(image).save(root / f"{i}.jpg", quality=95)
        paths.append(f"{i}.jpg")
    return ImageIndex(
        root=str(root), paths=tuple(paths), labels=np.arange(count) % 3, class_names=("a", "b", "c"),
        boxes=np.tile([0, 0, 200, 40], (count, 1)),
        captions=tuple((f"image {i}", f"picture {i}") for i in range(count)) if captions else None,
        name="toy",
    )


def test_a_prepared_split_is_webdataset_shards_read_back_by_offset(tmp_path):
    index = _index(tmp_path / "raw", captions=True)
    manifest = prepare_split(index, tmp_path / "prepared", ShardSettings(max_side=20, shard_size=4))

    assert manifest["count"] == 6 and manifest["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(tmp_path / "prepared" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.cls", "000000000.jpg", "000000000.json"]  # WebDataset samples
    split = PreparedSplit(tmp_path / "prepared")
    assert split.labels.tolist() == index.labels.tolist() and split.class_names == index.class_names
    image = split.open_image(5)
    assert image.size == (100, 20)  # the 200 x 40 crop, shorter side resized to 20
    assert np.abs(np.asarray(image)[10, 50].astype(int) - [200, 55, 100]).max() < 8
    assert split.captions[2] == ("image 2", "picture 2")
    odd = split.restrict_to_classes([1])
    assert len(odd) == 2 and np.asarray(odd.open_image(1))[10, 50, 0] > 150  # example 4


def test_a_prepared_split_is_rewritten_only_when_its_inputs_or_size_change(tmp_path):
    index = _index(tmp_path / "raw")
    prepare_split(index, tmp_path / "prepared", ShardSettings(max_side=20))
    shard = tmp_path / "prepared" / "shard-000000.tar"
    written = shard.stat().st_mtime_ns
    prepare_split(index, tmp_path / "prepared", ShardSettings(max_side=20, num_workers=0))
    assert shard.stat().st_mtime_ns == written
    prepare_split(index, tmp_path / "prepared", ShardSettings(max_side=16))
    assert PreparedSplit(tmp_path / "prepared").open_image(0).size == (80, 16)
    prepare_split(index.subset(np.arange(4)), tmp_path / "prepared", ShardSettings(max_side=16))
    assert read_manifest(tmp_path / "prepared")["count"] == 4


def test_bad_images_are_skipped_and_counted_up_to_the_limit_then_stop_naming_them(tmp_path):
    index = _index(tmp_path / "raw")
    write_truncated_jpeg(tmp_path / "raw" / "1.jpg")
    with mlflow.start_run() as run:
        PreparedSplitDataset(str(tmp_path / "prepared")).save(ShardRequest(index, ShardSettings(max_bad_images=1)))
    manifest = read_manifest(tmp_path / "prepared")
    assert manifest["count"] == 5 and manifest["bad_images"] == 1 and "1.jpg" in manifest["bad_examples"][0]
    assert mlflow.get_run(run.info.run_id).data.metrics["data/prepared/bad_images"] == 1
    assert PreparedSplit(tmp_path / "prepared").labels.tolist() == [0, 2, 0, 1, 2]

    (tmp_path / "raw" / "4.jpg").write_bytes(b"not a jpeg")
    before = (tmp_path / "prepared" / "index.npz").read_bytes()
    with pytest.raises(TooManyBadImages, match="max_bad_images = 1") as error:
        prepare_split(index, tmp_path / "prepared", ShardSettings(max_bad_images=1, max_side=20))
    assert "1.jpg" in str(error.value) and "4.jpg" in str(error.value)
    # The split already there is untouched and no half-written folder is left beside it.
    assert (tmp_path / "prepared" / "index.npz").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_a_missing_prepared_split_names_the_command_that_writes_it(tmp_path):
    with pytest.raises(ValueError, match="kedro run --pipelines"):
        PreparedSplit(tmp_path / "nothing")


def test_transforms_follow_the_model_resolution_and_the_paper(micro):
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    size, mean, std = micro.image_size, micro.image_mean, micro.image_std
    train, test = train_transform(size, mean, std), eval_transform(size, mean, std)
    assert train(image, np.random.default_rng(0)).shape == test(image).shape == (3, size, size)
    assert train.resize.size == round(size * 256 / 224) and train.resize.interpolation.value == "bicubic"
    red = (1.0 - mean[0]) / std[0]
    # A constant image stays constant through bicubic resizing up to float32 rounding of the
    # kernel weights' sum (~1e-7 of 255); 1e-4 after normalisation is a bound, not a fit.
    assert torch.allclose(test(image)[0], torch.full((size, size), red), atol=1e-4)


def test_loader_settings_are_checked():
    with pytest.raises(LoaderConfigError, match="unknown loader parameter"):
        LoaderConfig.from_params({"workers": 2})
    with pytest.raises(LoaderConfigError, match="num_workers"):
        LoaderConfig.from_params({"num_workers": -1})
    assert LoaderConfig().loader_kwargs(torch.device("cpu"))["pin_memory"] is False
    assert LoaderConfig().loader_kwargs(torch.device("cuda"))["pin_memory"] is True


def test_workers_return_the_batches_in_the_order_asked_with_the_same_pixels(tmp_path, micro):
    prepare_split(_index(tmp_path / "raw", count=9), tmp_path / "prepared")
    split = PreparedSplit(tmp_path / "prepared")
    order = [np.array([4, 0]), np.array([8, 3, 1]), np.array([2])]
    batches = {}
    for workers in (0, 2):
        source = training_source(split, LoaderConfig(num_workers=workers, persistent_workers=False))
        batches[workers] = list(source.train_batches(micro, order, torch.device("cpu"), False, False))
    for zero, two, indices in zip(batches[0], batches[2], order):
        assert zero.indices.tolist() == two.indices.tolist() == indices.tolist()
        assert torch.equal(zero.pixels, two.pixels)
    clean = list(StreamedImages(split).clean_batches(micro, 4, torch.device("cpu")))
    assert [len(i) for i, _ in clean] == [4, 4, 1]
    assert torch.equal(clean[0][1][0], batches[0][0].pixels[1])  # image 0, eval transform both times


def test_augmented_batches_are_reproducible_from_the_seed(tmp_path, micro):
    prepare_split(_index(tmp_path / "raw", count=4, noise=True), tmp_path / "prepared")
    split = PreparedSplit(tmp_path / "prepared")
    order = [np.array([0, 1, 2, 3]), np.array([3, 2])]
    first, again, other = (
        list(training_source(split, LoaderConfig(num_workers=workers, persistent_workers=False))
             .train_batches(micro, order, torch.device("cpu"), True, True, seed=seed))
        for seed, workers in ((3, 0), (3, 2), (4, 0))
    )
    for one, two in zip(first, again):  # the same with or without workers
        assert torch.equal(one.pixels, two.pixels)
    assert not torch.equal(first[0].pixels, other[0].pixels)
    assert first[0].clean_pixels.shape == first[0].pixels.shape


def test_manifest_is_plain_json(tmp_path):
    prepare_split(_index(tmp_path / "raw", count=2), tmp_path / "prepared")
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["fingerprint"] and manifest["format_version"] == 2
