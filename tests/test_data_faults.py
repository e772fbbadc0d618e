"""The data layer's faults, each fixed and kept fixed: a replaced image prepares its split again,
16-bit and palette PNGs keep their picture, degenerate COCO boxes are dropped and counted, bad
images count per file, duplicate COCO ids are refused, half-written folders are cleaned, a
truncated shard is named, prepared folders follow the umask, crop boxes use float64."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_continual.data.coco import coco_crops
from clip_continual.data.common import DataFormatError
from clip_continual.data.images import BadImageError, open_image
from clip_continual.data.index import ImageIndex
from clip_continual.data.raw_files import RawFormatError
from clip_continual.data.shards import PreparedSplit, ShardSettings, prepare_split, read_manifest
from realdata_fixtures import COCO_CATEGORIES, write_coco2014, write_truncated_jpeg

SETTINGS = ShardSettings(max_side=16)


def _colour_files(root, colours, size=(24, 16)) -> ImageIndex:
    root.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", size, colour).save(root / f"{i}.png")
    return ImageIndex(root=str(root), paths=tuple(f"{i}.png" for i in range(len(colours))),
                      labels=np.zeros(len(colours)), class_names=("a",), name="toy")


def test_a_replaced_image_with_the_same_name_prepares_the_split_again(tmp_path):
    index = _colour_files(tmp_path / "raw", [(250, 0, 0), (0, 250, 0)])
    prepare_split(index, tmp_path / "prepared", SETTINGS)
    Image.new("RGB", (24, 16), (0, 0, 250)).save(tmp_path / "raw" / "0.png")  # same name, new pixels
    prepare_split(index, tmp_path / "prepared", SETTINGS)
    assert np.asarray(PreparedSplit(tmp_path / "prepared").open_image(0))[5, 5].argmax() == 2


def test_16_bit_and_palette_pngs_keep_their_picture(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    index = ImageIndex(root=str(tmp_path), paths=("grey16.png", "palette.png"), labels=[0, 0], class_names=("a",))

    grey = np.asarray(open_image(index, 0)).astype(int)
    assert grey[0, 0].tolist() == [0, 0, 0] and abs(grey[15, 15, 0] - 254) <= 1  # not all white
    assert abs(grey.mean() - 127.5) < 2
    assert np.asarray(open_image(index, 1))[3, 3].tolist() == [200, 30, 10]


def _coco(tmp_path):
    return write_coco2014(tmp_path / "coco", COCO_CATEGORIES[:4], train_boxes_per_class=1, boxes_per_image=4)


def _edit_train(coco, edit) -> None:
    path = coco.root / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def test_coco_boxes_outside_their_image_are_dropped_and_counted(tmp_path):
    coco = _coco(tmp_path)
    kept = len(coco_crops(coco.root, splits=("train",))["train"])

    def add_outside_boxes(document):
        image = document["images"][0]
        for n, box in enumerate(([image["width"] + 5.0, 2.0, 10.0, 10.0], [2.0, image["height"] - 2.0, 10.0, 10.0])):
            document["annotations"].append({**document["annotations"][0], "bbox": box, "id": 10_000 + n})

    _edit_train(coco, add_outside_boxes)
    train = coco_crops(coco.root, splits=("train",))["train"]
    assert len(train) == kept and train.dropped_boxes == 2
    manifest = prepare_split(train, tmp_path / "prepared", SETTINGS)
    assert manifest["dropped_boxes"] == 2


def test_duplicate_coco_image_ids_are_refused_naming_them(tmp_path):
    coco = _coco(tmp_path)
    _edit_train(coco, lambda d: d["images"].append({**d["images"][0], "file_name": "other.jpg"}))
    duplicate = json.loads((coco.root / "annotations" / "instances_train2014.json").read_text())["images"][0]["id"]
    with pytest.raises(RawFormatError, match=rf"more than once, e.g. \[{duplicate}\]"):
        coco_crops(coco.root, splits=("train",))


def test_bad_images_count_files_not_crops(tmp_path):
    index = _colour_files(tmp_path / "raw", [(250, 0, 0), (0, 250, 0)])
    write_truncated_jpeg(tmp_path / "raw" / "broken.jpg")
    crops = ImageIndex(root=index.root, paths=("0.png", "broken.jpg", "broken.jpg", "broken.jpg", "1.png"),
                       labels=np.zeros(5), class_names=("a",), boxes=np.tile([0, 0, 8, 8], (5, 1)))
    manifest = prepare_split(crops, tmp_path / "prepared", ShardSettings(max_side=16, max_bad_images=1))
    assert (manifest["count"], manifest["bad_images"], manifest["bad_crops"]) == (2, 1, 3)


def test_half_written_folders_of_dead_runs_are_removed_at_start(tmp_path):
    index = _colour_files(tmp_path / "raw", [(250, 0, 0)])
    dead = tmp_path / ".prepared.partial-999999999-abcd"  # no such process
    older = tmp_path / ".prepared.partial-k2j3h4"  # left by a version without pids in the name
    alive = tmp_path / f".prepared.partial-{os.getppid()}-beef"  # a running process's work
    for folder in (dead, older, alive):
        folder.mkdir()
        (folder / "shard-000000.tar").write_bytes(b"half")
    prepare_split(index, tmp_path / "prepared", SETTINGS)
    assert not dead.exists() and not older.exists() and alive.exists()


def test_a_truncated_shard_is_named_and_prepared_again(tmp_path):
    index = _colour_files(tmp_path / "raw", [(250, 0, 0), (0, 250, 0)])
    prepare_split(index, tmp_path / "prepared", SETTINGS)
    shard = tmp_path / "prepared" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DataFormatError, match=r"shard '.*shard-000000.tar' is 700 bytes"):
        PreparedSplit(tmp_path / "prepared")
    prepare_split(index, tmp_path / "prepared", SETTINGS)  # not taken as up to date
    assert PreparedSplit(tmp_path / "prepared").open_image(1).size == (24, 16)


def test_an_unreadable_image_in_a_shard_names_the_shard_and_the_source(tmp_path):
    index = _colour_files(tmp_path / "raw", [(250, 0, 0)])
    prepare_split(index, tmp_path / "prepared", SETTINGS)
    split = PreparedSplit(tmp_path / "prepared")
    offset, size = int(split._arrays["offset"][0]), int(split._arrays["size"][0])
    with open(tmp_path / "prepared" / "shard-000000.tar", "r+b") as handle:  # same size, garbage
        handle.seek(offset)
        handle.write(b"\0" * size)
    with pytest.raises(DataFormatError, match=r"example 0 \('0.png'\) in shard .*shard-000000.tar"):
        PreparedSplit(tmp_path / "prepared").open_image(0)


def test_prepared_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        prepare_split(_colour_files(tmp_path / "raw", [(250, 0, 0)]), tmp_path / "prepared", SETTINGS)
    finally:
        os.umask(previous)
    assert (tmp_path / "prepared").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "prepared" / "shard-000000.tar").stat().st_mode & 0o777 == 0o644


def test_crop_boxes_use_float64_arithmetic_as_cocos_own(tmp_path):
    Image.new("RGB", (32, 16), (90, 90, 90)).save(tmp_path / "a.png")
    # float32 stores 10.4999999 as 10.5: x + w rounds to 16, not 15 (one pixel wider).
    index = ImageIndex(root=str(tmp_path), paths=("a.png",), labels=[0], class_names=("a",),
                       boxes=[[10.4999999, 2.0, 5.0, 5.0]])
    assert index.boxes.dtype == np.float64
    assert open_image(index, 0).size == (5, 5)
    outside = ImageIndex(root=str(tmp_path), paths=("a.png",), labels=[0], class_names=("a",),
                         boxes=[[40.0, 2.0, 5.0, 5.0]])
    with pytest.raises(BadImageError, match="outside the 32 x 16 image"):
        open_image(outside, 0)


def test_a_torchvision_source_lists_its_files_for_the_fingerprint(tmp_path):
    from clip_continual.data.shards import example_files
    from clip_continual.data.source import SubsetSource

    class Listed:
        _image_files = [tmp_path / "x.jpg", tmp_path / "y.jpg"]

    source = SubsetSource("s", Listed(), np.array([1]), np.array([0, 0]), ("a",), ("{}",))
    assert example_files(source) == [tmp_path / "y.jpg"]
