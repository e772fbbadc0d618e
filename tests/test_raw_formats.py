"""The readers of users' raw dataset files, on miniature copies of the real layouts."""

import json
import shutil

import numpy as np
import pytest
import torch

from clip_continual.data.coco import COCO_PROMPT, coco_class_names, coco_crops
from clip_continual.data.common import DataFormatError
from clip_continual.data.eurosat import EUROSAT_PROMPT, eurosat_class_name, eurosat_splits
from clip_continual.data.image_folder import ZERO_SHOT_PROMPT, image_folder_index
from clip_continual.data.images import BadImageError, open_image
from clip_continual.data.index import ImageIndex
from clip_continual.data.karpathy import COCO_RETRIEVAL_FOLDS, coco_retrieval, flickr30k_retrieval
from clip_continual.data.raw_files import EmptyDataError, MissingInputError, RawFormatError
from clip_continual.data.tiered_imagenet import tiered_imagenet_test_classes, tiered_imagenet_test_index
from clip_continual.evaluation.retrieval import caption_index, retrieval_metrics
from clip_continual.evaluation.zero_shot import fill_template
from realdata_fixtures import (
    COCO_CATEGORIES, EUROSAT_FOLDERS, class_colour, write_coco2014, write_eurosat, write_flickr30k,
    write_image_folder, write_jpeg, write_not_an_image, write_truncated_jpeg,
)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco2014(tmp_path_factory.mktemp("coco") / "coco2014")


@pytest.fixture(scope="module")
def coco_splits(coco):
    return coco_crops(coco.root)


def _crops_of(index):
    return [(p, tuple(b), int(l)) for p, b, l in zip(index.paths, index.boxes.tolist(), index.labels)]


def _expected(crops):
    return [(c.path, c.box, c.label) for c in crops]


# --- COCO crops ---------------------------------------------------------------------------------


def test_coco_crops_are_the_boxes_written_in_file_order(coco, coco_splits):
    for split in ("train", "val", "test"):
        assert _crops_of(coco_splits[split]) == _expected(getattr(coco, split)), split
        assert coco_splits[split].name == f"coco_crops_{split}"


def test_coco_keeps_only_boxes_wider_and_taller_than_4px(coco, coco_splits):
    assert coco.small_boxes >= 10  # the fixture has sides of 4, 3.5 and 2 px to drop
    for index in coco_splits.values():
        assert (index.boxes[:, 2:] > 4).all()
    total = sum(len(content["annotations"]) for content in (
        json.loads((coco.root / "annotations" / f"instances_{f}.json").read_text()) for f in ("train2014", "val2014")))
    kept = sum(len(index) for index in coco_splits.values())
    in_no_split = coco.restval_boxes + 2  # restval images, and one val2014 image Karpathy omits
    assert kept == total - coco.small_boxes - in_no_split


def test_coco_val_and_test_crops_come_from_the_karpathy_splits(coco, coco_splits):
    karpathy = json.loads(coco.karpathy_json.read_text())["images"]
    for split in ("val", "test"):
        expected = {f"{e['filepath']}/{e['filename']}" for e in karpathy if e["split"] == split}
        assert set(coco_splits[split].paths) == expected
    restval = {f"{e['filepath']}/{e['filename']}" for e in karpathy if e["split"] == "restval"}
    assert restval and not restval & (set(coco_splits["val"].paths) | set(coco_splits["test"].paths))
    assert all(p.startswith("train2014/COCO_train2014_") for p in coco_splits["train"].paths)


def test_coco_classes_follow_category_id_even_when_the_file_lists_them_shuffled(tmp_path):
    shuffled = tuple(COCO_CATEGORIES[i] for i in np.random.default_rng(0).permutation(80))
    fixture = write_coco2014(tmp_path / "coco", shuffled, train_boxes_per_class=1)
    splits = coco_crops(fixture.root)
    names = [name for _, name in COCO_CATEGORIES]
    assert list(splits["train"].class_names) == names == list(coco_class_names(fixture.root))
    assert names[:10] == ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
                          "truck", "boat", "traffic light"]
    assert _crops_of(splits["test"]) == _expected(fixture.test)
    # MST phase p: classes with index // 10 == p, 8 phases of 10
    assert np.bincount(splits["test"].labels // 10).tolist() == [10] * 8


def test_coco_prompt_is_the_papers():
    assert fill_template(COCO_PROMPT, "traffic light") == "this is a photo of traffic light in the scene ."


def test_open_image_cuts_the_box_out(coco_splits):
    test = coco_splits["test"]
    for i in (0, 13, 79):
        crop = open_image(test, i)
        x, y, w, h = test.boxes[i]
        assert crop.mode == "RGB" and crop.size == (round(x + w) - round(x), round(y + h) - round(y))
        centre = np.array(crop.getpixel((crop.size[0] // 2, crop.size[1] // 2)))
        assert np.abs(centre - class_colour(int(test.labels[i]))).max() <= 20  # JPEG tolerance


def test_coco_train_only_needs_no_karpathy_file(coco, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco.root / "annotations", root / "annotations")
    shutil.copytree(coco.root / "train2014", root / "train2014")
    (root / "annotations" / "instances_val2014.json").unlink()
    assert len(coco_crops(root, splits=("train",))["train"]) == len(coco.train)


# --- COCO bad input -----------------------------------------------------------------------------


def test_coco_missing_folder_or_file_is_named(coco, tmp_path):
    with pytest.raises(MissingInputError, match="COCO 2014 folder.*nowhere.*Unpack train2014.zip"):
        coco_crops(tmp_path / "nowhere")
    root = tmp_path / "coco"
    shutil.copytree(coco.root / "annotations", root / "annotations")
    with pytest.raises(MissingInputError, match="train2014 images: expected a folder at .*train2014"):
        coco_crops(root)
    (root / "train2014").mkdir()
    with pytest.raises(MissingInputError, match=r"COCO train2014 images: none of 32 image files sampled .* exists, "
                                                 r"e.g. '.*train2014/COCO_train2014_000000000009.jpg'"):
        coco_crops(root, splits=("train",))  # an empty image folder is caught before any work, too
    (root / "annotations" / "instances_train2014.json").unlink()
    with pytest.raises(MissingInputError, match="instances_train2014.json', found nothing"):
        coco_crops(root)


def test_coco_missing_karpathy_file_is_named_before_any_json_is_parsed(coco, tmp_path):
    root = tmp_path / "coco"
    for folder in ("annotations", "train2014", "val2014"):
        shutil.copytree(coco.root / folder, root / folder)
    (root / "annotations" / "instances_train2014.json").write_text("{ not json")  # would fail if parsed
    with pytest.raises(MissingInputError, match="Karpathy caption file: expected a file at '.*dataset_coco.json'"):
        coco_crops(root)


def _edit_val_instances(coco, tmp_path, edit):
    root = shutil.copytree(coco.root, tmp_path / "coco")
    path = root / "annotations" / "instances_val2014.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return root


def test_coco_files_of_different_releases_or_with_broken_annotations_are_refused(coco, tmp_path):
    def rename(document):
        document["categories"][0]["name"] = "human"

    root = _edit_val_instances(coco, tmp_path / "a", rename)
    with pytest.raises(RawFormatError, match="instances_train2014.json' and .*instances_val2014.json' list "
                                             "different categories"):
        coco_crops(root, coco.karpathy_json)

    def drop_a_category(document):
        document["categories"] = document["categories"][1:]

    root = _edit_val_instances(coco, tmp_path / "b", drop_a_category)
    with pytest.raises(RawFormatError, match="instances_val2014.json' annotates category 1, which its 'categories' "
                                             "list lacks"):
        coco_crops(root, coco.karpathy_json, splits=("test",))

    def break_a_box(document):
        document["annotations"][3]["bbox"] = [1.0, 2.0]

    root = _edit_val_instances(coco, tmp_path / "c", break_a_box)
    with pytest.raises(RawFormatError, match=r"annotation \d+ in '.*instances_val2014.json' has no valid bbox"):
        coco_crops(root, coco.karpathy_json, splits=("val",))


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_json_without_a_section_is_refused(coco, tmp_path, key):
    root = shutil.copytree(coco.root, tmp_path / "coco")
    path = root / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    del document[key]
    path.write_text(json.dumps(document))
    with pytest.raises(RawFormatError, match=rf"instances_train2014.json' has no list under \['{key}'\].*"
                                             "annotations_trainval2014.zip"):
        coco_crops(root)


def test_coco_json_that_does_not_parse_is_refused(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations" / "instances_train2014.json").write_text('{"images": [')
    with pytest.raises(RawFormatError, match="instances_train2014.json' is not valid JSON"):
        coco_crops(tmp_path, splits=("train",))


def test_karpathy_file_without_the_split_is_refused(coco, tmp_path):
    karpathy = json.loads(coco.karpathy_json.read_text())
    karpathy["images"] = [e for e in karpathy["images"] if e["split"] != "test"]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    with pytest.raises(EmptyDataError, match=r"dataset_coco.json' has no image in split 'test' \(found the "
                                             r"splits \['restval', 'train', 'val'\]\)"):
        coco_crops(coco.root, path)
    with pytest.raises(EmptyDataError, match="split 'test'"):
        coco_retrieval(coco.root, path)


def test_coco_split_without_usable_box_is_refused(coco, tmp_path):
    karpathy = json.loads(coco.karpathy_json.read_text())
    for entry in karpathy["images"]:
        entry["filename"] = entry["filename"].replace("COCO_val2014_", "COCO_val2017_")
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    with pytest.raises(EmptyDataError, match="split 'val' is empty.*Karpathy's split"):
        coco_crops(coco.root, path, splits=("val",))


# --- retrieval ----------------------------------------------------------------------------------


def test_coco_retrieval_is_the_karpathy_test_images_in_order_with_five_captions(coco, caplog):
    index = coco_retrieval(coco.root)
    assert "coco_5k_test has 10 images, not the published 5000" in caplog.text
    assert list(index.paths) == coco.test_images and len(index) == 10
    assert [list(c) for c in index.captions] == coco.test_captions  # first five of six, too
    assert (index.labels == -1).all() and index.class_names == ()
    assert open_image(index, 0).size == (64, 44)


def test_coco_retrieval_folds_average_consecutive_blocks_of_images(coco):
    index = coco_retrieval(coco.root)
    texts, owner = caption_index(np.array(index.captions))
    generator = torch.Generator().manual_seed(0)
    images, captions = torch.randn(len(index), 8, generator=generator), torch.randn(len(texts), 8, generator=generator)
    pooled = retrieval_metrics(images, captions, owner, folds=COCO_RETRIEVAL_FOLDS)
    per_fold = []
    for start in range(0, 10, 2):  # 10 images -> 5 folds of 2, as 5,000 -> 5 folds of 1,000
        mine = (owner >= start) & (owner < start + 2)
        per_fold.append(retrieval_metrics(images[start:start + 2], captions[mine], owner[mine] - start))
    assert pooled == pytest.approx({k: np.mean([f[k] for f in per_fold]) for k in pooled})
    assert pooled != retrieval_metrics(images, captions, owner)  # folding changes the gallery


def test_flickr30k_retrieval_is_the_test_split(tmp_path):
    fixture = write_flickr30k(tmp_path / "flickr30k")
    index = flickr30k_retrieval(fixture.root)
    assert list(index.paths) == fixture.test_images
    assert [list(c) for c in index.captions] == fixture.test_captions
    assert index.path(0) == fixture.images_dir / fixture.test_images[0] and index.name == "flickr30k_1k_test"


def test_karpathy_image_with_too_few_captions_is_refused(tmp_path):
    fixture = write_flickr30k(tmp_path / "flickr30k")
    document = json.loads(fixture.karpathy_json.read_text())
    test_entry = next(e for e in document["images"] if e["split"] == "test")
    test_entry["sentences"] = test_entry["sentences"][:4]
    fixture.karpathy_json.write_text(json.dumps(document))
    with pytest.raises(RawFormatError, match=f"image '{test_entry['filename']}' .* has 4 captions"):
        flickr30k_retrieval(fixture.root)


def test_retrieval_without_its_image_folder_is_refused(tmp_path):
    fixture = write_flickr30k(tmp_path / "flickr30k")
    shutil.rmtree(fixture.images_dir)
    with pytest.raises(MissingInputError, match="expected a folder at '.*flickr30k-images', found nothing"):
        flickr30k_retrieval(fixture.root)
    fixture.images_dir.mkdir()
    with pytest.raises(MissingInputError, match="none of 6 image files sampled from the index exists"):
        flickr30k_retrieval(fixture.root)


# --- zero-shot image folders --------------------------------------------------------------------


@pytest.mark.parametrize("map_format", ["json", "csv"])
def test_image_folder_with_a_class_map(tmp_path, map_format):
    names = {"n02": "golden retriever", "n01": "tench", "n03": "ice cream"}
    class_map = write_image_folder(tmp_path / "zs", {"n01": 2, "n02": 3, "n03": 1}, class_map=names,
                                   map_format=map_format)
    (tmp_path / "zs" / "n01" / "notes.txt").write_text("not an image")
    index = image_folder_index(tmp_path / "zs", class_map)
    assert index.class_names == ("tench", "golden retriever", "ice cream")
    assert index.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert index.paths[:2] == ("n01/n01_0.JPEG", "n01/n01_1.JPEG")
    assert fill_template(ZERO_SHOT_PROMPT, index.class_names[0]) == "this is a photo of tench ."


def test_image_folder_without_a_map_uses_the_folder_names(tmp_path):
    write_image_folder(tmp_path / "zs", {"dog": 1, "cat": 2})
    index = image_folder_index(tmp_path / "zs")
    assert index.class_names == ("cat", "dog") and index.labels.tolist() == [0, 0, 1]
    assert open_image(index, 2).size == (10, 8)


def test_imagenet_class_index_json_serves_as_a_class_map(tmp_path):
    write_image_folder(tmp_path / "train", {"n01440764": 1, "n01443537": 1})
    path = tmp_path / "imagenet_class_index.json"
    path.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"],
                                "2": ["n01484850", "great_white_shark"]}))
    assert image_folder_index(tmp_path / "train", path).class_names == ("tench", "goldfish")


@pytest.mark.parametrize("file_name, content, message", [
    ("map.json", "[1, 2]", "must hold a JSON object of strings"),
    ("map.csv", "folder,name\nn01,tench\nn02,goldfish,extra\n", "data row 2 of .* does not have two columns"),
    ("map.txt", "n01 tench", r"must end in .json or .csv"),
])
def test_malformed_class_map_is_refused(tmp_path, file_name, content, message):
    write_image_folder(tmp_path / "zs", {"n01": 1})
    (tmp_path / file_name).write_text(content)
    with pytest.raises(RawFormatError, match=f"class map: .*{message}") as caught:
        image_folder_index(tmp_path / "zs", tmp_path / file_name)
    assert str(tmp_path / file_name) in str(caught.value)


def test_class_map_that_misses_a_folder_is_refused(tmp_path):
    class_map = write_image_folder(tmp_path / "zs", {"n01": 1, "n02": 1, "n03": 1},
                                   class_map={"n01": "tench", "n04": "extra"}, map_format="csv")
    with pytest.raises(RawFormatError, match=r"class_map.csv' names no class for 2 of the 3 folders, "
                                             r"e.g. \['n02', 'n03'\]. Add a 'folder -> class name' entry"):
        image_folder_index(tmp_path / "zs", class_map)


def test_empty_class_folder_or_empty_dataset_is_refused(tmp_path):
    write_image_folder(tmp_path / "zs", {"n01": 1, "n02": 0})
    with pytest.raises(EmptyDataError, match=r"1 class folders under .* hold no image .*\['n02'\]"):
        image_folder_index(tmp_path / "zs")
    (tmp_path / "bare").mkdir()
    with pytest.raises(EmptyDataError, match="'.*bare' has no class folder"):
        image_folder_index(tmp_path / "bare")
    with pytest.raises(MissingInputError, match="expected a folder at '.*absent', found nothing"):
        image_folder_index(tmp_path / "absent")


def test_tiered_imagenet_selects_the_160_published_test_classes(tmp_path):
    classes = tiered_imagenet_test_classes()
    assert len(classes) == len({wnid for wnid, _ in classes}) == len({name for _, name in classes}) == 160
    assert classes[0] == ("n03314780", "face powder")
    folders = {wnid: 1 for wnid, _ in classes} | {"n02085620": 2, "n15075141": 1}  # two non-test classes
    write_image_folder(tmp_path / "train", folders)
    index = tiered_imagenet_test_index(tmp_path / "train")
    assert len(index) == 160 and len(index.class_names) == 160
    wnids = sorted(wnid for wnid, _ in classes)
    assert [p.split("/")[0] for p in index.paths] == wnids
    assert index.class_names[wnids.index("n07583066")] == "guacamole"


def test_tiered_imagenet_missing_classes_are_named(tmp_path):
    write_image_folder(tmp_path / "train", {"n02085620": 1})
    with pytest.raises(MissingInputError, match="160 of the 160 class folders .* ImageNet's train folder"):
        tiered_imagenet_test_index(tmp_path / "train")


# --- EuroSAT ------------------------------------------------------------------------------------


def test_eurosat_test_is_the_last_files_by_name_of_each_class(tmp_path):
    fixture = write_eurosat(tmp_path / "2750", 12)
    splits = eurosat_splits(fixture.root, test_per_class=5)
    for label, folder in enumerate(EUROSAT_FOLDERS):
        files = [f"{folder}/{name}" for name in fixture.files[folder]]
        assert [p for p, l in zip(splits["test"].paths, splits["test"].labels) if l == label] == files[-5:]
        assert [p for p, l in zip(splits["train"].paths, splits["train"].labels) if l == label] == files[:-5]
    assert fixture.files["River"][-1] == "River_9.jpg"  # name order, not number order
    assert splits["train"].class_names[2] == "herbaceous vegetation" == eurosat_class_name("HerbaceousVegetation")
    assert fill_template(EUROSAT_PROMPT, "sea lake") == "this is a satellite photo of sea lake ."


def test_eurosat_holds_out_500_per_class_by_default(tmp_path):
    fixture = write_eurosat(tmp_path / "2750", 501, size=1)
    splits = eurosat_splits(fixture.root)
    assert np.bincount(splits["test"].labels).tolist() == [500] * 10
    assert np.bincount(splits["train"].labels).tolist() == [c - 500 for c in fixture.counts.values()]


def test_eurosat_layout_errors_are_named(tmp_path):
    write_eurosat(tmp_path / "eurosat" / "2750", 3)
    with pytest.raises(MissingInputError, match=r"lacks the class folders .*AnnualCrop.* \['2750'\]: is the data "
                                                 "one level further down"):
        eurosat_splits(tmp_path / "eurosat")
    with pytest.raises(EmptyDataError, match=r"AnnualCrop' holds 3 images, so the last 500 leave no training"):
        eurosat_splits(tmp_path / "eurosat" / "2750")
    shutil.rmtree(tmp_path / "eurosat" / "2750" / "Forest")
    with pytest.raises(MissingInputError, match=r"lacks the class folders \['Forest'\]"):
        eurosat_splits(tmp_path / "eurosat" / "2750", test_per_class=1)


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("writer, reason", [
    (write_truncated_jpeg, "OSError"), (write_not_an_image, "cannot identify image file"), (None, "no such file"),
])
def test_unreadable_images_raise_bad_image_error_naming_the_file(tmp_path, writer, reason):
    write_jpeg(tmp_path / "good.jpg")
    if writer is not None:
        writer(tmp_path / "bad.jpg")
    index = ImageIndex(str(tmp_path), ("good.jpg", "bad.jpg"), np.array([-1, -1]), ())
    assert open_image(index, 0).size == (16, 12)
    with pytest.raises(BadImageError, match=f"unreadable image '.*bad.jpg': .*{reason}") as caught:
        open_image(index, 1)
    assert caught.value.path == str(tmp_path / "bad.jpg") and isinstance(caught.value, DataFormatError)
