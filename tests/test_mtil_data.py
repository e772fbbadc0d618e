"""The MTIL and class-incremental CIFAR-100 data layer, on the eleven datasets written in
torchvision's layouts by ``mtil_fixtures``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import mtil_fixtures as fx
from clip_continual.data import class_incremental as cil
from clip_continual.data import mtil, zscl_text
from clip_continual.data import torchvision_sets as tvs
from clip_continual.data.common import DataFormatError
from clip_continual.evaluation.zero_shot import fill_template

RANDOM_SPLIT = ("caltech101", "eurosat", "sun397")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict[str, fx.WrittenSet]]:
    root = tmp_path_factory.mktemp("raw")
    return root, fx.write_mtil_raw(root)


@pytest.fixture
def checksums_bypassed(monkeypatch):
    fx.accept_unofficial_checksums(monkeypatch)


@pytest.mark.parametrize("key", sorted(tvs.SPECS))
def test_each_dataset_reads_through_torchvision_with_zscl_split(raw, checksums_bypassed, key):
    root, written = raw
    train, test = tvs.load_split(key, root, "train"), tvs.load_split(key, root, "test")
    facts = written[key]
    if key in RANDOM_SPLIT:
        total = facts.train_count
        assert (len(train), len(test)) == (int(0.8 * total), total - int(0.8 * total))
        assert not set(train.indices) & set(test.indices)
        assert sorted(set(train.indices) | set(test.indices)) == list(range(total))
    else:
        assert (len(train), len(test)) == (facts.train_count, facts.test_count)
    for source in (train, test):
        assert len(source.class_names) == len(facts.class_folders)
        assert source.templates == zscl_text.TEMPLATES[key]
        for i in (0, len(source) - 1):
            image, label = source[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert label == source.labels[i]  # the label table agrees with the item


def test_class_names_follow_zscl(raw, checksums_bypassed):
    root, _ = raw
    names = {key: tvs.load_split(key, root, "test").class_names for key in tvs.SPECS}
    # ZSCL's own lists, aligned with torchvision's class order
    assert names["caltech101"][fx.CALTECH101_FOLDERS.index("car_side")] == "side of a car"
    assert names["caltech101"][:2] == ("off-center face", "centered face")
    assert names["eurosat"][fx.EUROSAT_FOLDERS.index("SeaLake")] == "lake or sea"
    assert names["flowers"][59] == "pink-yellow dahlia"  # torchvision's own list says "pink-yellow dahlia?"
    # torchvision's names, "_" -> " "
    assert names["cifar100"][1] == "aquarium fish"
    assert names["food"] == ("apple pie", "baby back ribs", "caesar salad")
    assert names["mnist"][0] == "0 - zero"
    assert names["oxford_pet"] == ("Abyssinian", "American Bulldog", "German Shorthaired")
    assert names["sun397"][1] == "apartment building/outdoor"
    assert names["aircraft"] == fx.AIRCRAFT_VARIANTS
    assert names["stanford_cars"] == fx.CAR_CLASSES


def test_labels_match_the_files(raw, checksums_bypassed):
    """A class's images carry its label: the fixture paints every class its own colour."""
    root, _ = raw
    for key in ("dtd", "food", "mnist", "cifar100", "eurosat"):
        source = tvs.load_split(key, root, "test")
        for i in range(len(source)):
            image, label = source[i]
            mode = "L" if key == "mnist" else "RGB"
            expected = np.asarray(fx.class_image(label, 0, size=image.size[0], mode=mode).convert("RGB"))
            assert np.abs(np.asarray(image, dtype=int).mean((0, 1)) - expected.mean((0, 1))).max() < 12


def test_random_split_is_zscl_s():
    """int(0.8 n) train examples drawn by torch's random_split with seed 42, deterministic."""
    train, test = tvs.zscl_random_split(101)
    assert (len(train), len(test)) == (80, 21)
    permutation = torch.randperm(101, generator=torch.Generator().manual_seed(42)).numpy()
    assert np.array_equal(np.concatenate([train, test]), permutation)
    assert np.array_equal(tvs.zscl_random_split(101)[0], train)
    assert not np.array_equal(tvs.zscl_random_split(101, seed=0)[0], train)


def test_sun397_split_does_not_depend_on_the_listing_order(raw, monkeypatch):
    root, _ = raw
    def test_files(reverse: bool) -> set[str]:
        dataset = tvs.open_torchvision("sun397", root, train=False)
        if reverse:
            dataset._image_files.reverse()
            dataset._labels.reverse()
        positions = tvs.split_positions("sun397", dataset, "test")
        return {str(dataset._image_files[i]) for i in positions}
    assert test_files(False) == test_files(True)


@pytest.mark.parametrize("key, folder", [("cifar100", "cifar-100-python"), ("flowers", "flowers-102")])
def test_torchvision_still_checks_official_checksums(raw, key, folder):
    """Without the test's bypass the fixture's files are refused: users keep that check."""
    root, _ = raw
    with pytest.raises(DataFormatError, match="MD5") as error:
        tvs.load_split(key, root, "test")
    assert str(root / folder) in str(error.value) and "corrupted" in str(error.value)


@pytest.mark.parametrize("key", sorted(tvs.SPECS))
def test_missing_dataset_names_it_the_folder_and_what_to_put_there(tmp_path, key):
    spec = tvs.SPECS[key]
    with pytest.raises(DataFormatError) as error:
        tvs.load_split(key, tmp_path, "train")
    message = str(error.value)
    assert f"'{key}'" in message and str(tmp_path / spec.folder) in message and spec.layout in message
    assert ("kaggle" in message) if key == "stanford_cars" else ("download: true" in message)
    assert list(tmp_path.iterdir()) == []  # nothing created on the way to the error


def test_stanford_cars_download_says_where_to_get_it(tmp_path):
    with pytest.raises(DataFormatError, match="pytorch/vision/issues/7545"):
        tvs.load_split("stanford_cars", tmp_path, "train", download=True)


def test_download_offline_gives_one_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr("torchvision.datasets.dtd.download_and_extract_archive", offline)
    with pytest.raises(DataFormatError, match=r"'dtd'.*download: true.*no network"):
        tvs.load_split("dtd", tmp_path, "train", download=True)


def test_fixed_class_list_must_match_the_dataset(tmp_path):
    fx.write_eurosat(tmp_path)
    (tmp_path / "eurosat" / "2750" / "Extra").mkdir()
    fx.class_image(0, 0).save(tmp_path / "eurosat" / "2750" / "Extra" / "x.jpg")
    with pytest.raises(DataFormatError, match="11 classes.*10"):
        tvs.load_split("eurosat", tmp_path, "train")


def test_templates_as_zscl_uses_them():
    counts = {key: len(templates) for key, templates in zscl_text.TEMPLATES.items()}
    assert counts == {"aircraft": 2, "caltech101": 34, "cifar100": 18, "dtd": 8, "eurosat": 3,
                      "flowers": 1, "food": 1, "mnist": 1, "oxford_pet": 1, "stanford_cars": 9,
                      "sun397": 2}
    assert zscl_text.training_template("food") == "a photo of a {}, a type of food."
    assert zscl_text.training_template("stanford_cars") == "a photo of a {}, a type of car."
    assert fill_template(zscl_text.training_template("mnist"), "7 - seven") == 'a photo of the number: "7 - seven".'
    for templates in zscl_text.TEMPLATES.values():
        assert all(template.count("{}") == 1 for template in templates)
    assert (len(zscl_text.CALTECH101_CLASSES), len(zscl_text.EUROSAT_CLASSES),
            len(zscl_text.FLOWERS_CLASSES)) == (101, 10, 102)


def test_differences_from_clip_benchmark_are_as_documented():
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None:
        pytest.skip("clip_benchmark is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "datasets"
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())
    names = json.loads((folder / "en_classnames.json").read_text())
    theirs = {"aircraft": "fgvc_aircraft", "caltech101": "caltech101", "cifar100": "cifar100",
              "dtd": "dtd", "eurosat": "eurosat", "flowers": "flowers", "food": "food101",
              "mnist": "mnist", "oxford_pet": "pets", "stanford_cars": "cars", "sun397": "sun397"}
    differ = {key for key, name in theirs.items()
              if [t.replace("{c}", "{}") for t in templates[name]] != list(zscl_text.TEMPLATES[key])}
    assert differ == {"food", "stanford_cars"}
    assert names["eurosat"] == list(zscl_text.EUROSAT_CLASSES)
    assert names["caltech101"] == ["background", *zscl_text.CALTECH101_CLASSES]
    assert sum(a != b for a, b in zip(names["flowers"], zscl_text.FLOWERS_CLASSES)) == 3


def test_mtil_orders_and_learning_rates():
    assert sorted(mtil.ORDER_I) == sorted(mtil.ORDER_II) == sorted(tvs.SPECS)
    assert mtil.ORDER_I[:3] == ("aircraft", "caltech101", "cifar100")
    assert mtil.ORDER_II[:3] == ("stanford_cars", "food", "mnist") and mtil.ORDER_II[-1] == "cifar100"
    rates = dict(zip(mtil.ORDER_II, mtil.task_learning_rates(mtil.ORDER_II)))
    assert {k for k, lr in rates.items() if lr == 5e-5} == {"aircraft", "mnist"}
    assert set(rates.values()) == {5e-5, 1e-5}
    with pytest.raises(ValueError, match="order3"):
        mtil.order("order3")


def test_few_shot_draws_k_per_class_reproducibly():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    chosen = mtil.few_shot_positions(labels, shots=5, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [5, 3, 5]
    assert np.array_equal(chosen, mtil.few_shot_positions(labels, shots=5, seed=0))
    assert not np.array_equal(chosen, mtil.few_shot_positions(labels, shots=5, seed=1))
    with pytest.raises(ValueError, match="positive"):
        mtil.few_shot_positions(labels, shots=0, seed=0)


def test_few_shot_source_keeps_k_images_per_class(raw):
    root, _ = raw
    train = tvs.load_split("eurosat", root, "train")
    shots = mtil.few_shot(train, 1, seed=0)
    assert sorted(shots.labels) == sorted(set(train.labels)) and len(shots) == len(set(train.labels))
    assert shots.open_image(0).mode == "RGB" and mtil.few_shot(train, None, seed=0) is train


def test_few_shot_applies_to_a_prepared_split_in_the_training_node(raw, tmp_path):
    from clip_continual.data.shards import PreparedSplit, prepare_split
    from clip_continual.pipelines.continual_learning.nodes import few_shot_train_set

    root, _ = raw
    prepare_split(tvs.load_split("eurosat", root, "train"), tmp_path / "eurosat_train")
    prepared = PreparedSplit(tmp_path / "eurosat_train")
    shots = few_shot_train_set(prepared, {"few_shot": 2, "few_shot_seed": 3})
    assert np.bincount(shots.labels).max() == 2 and set(shots.labels) == set(prepared.labels)
    assert few_shot_train_set(prepared, {"few_shot": None}) is prepared


def test_cifar100_class_order_and_steps():
    order = cil.CIFAR100_CLASS_ORDER
    assert sorted(order) == list(range(100)) and order[:4] == (87, 0, 52, 58) and order[-1] == 39
    for steps in (10, 20, 50):
        phases = cil.cifar100_phases(steps)
        assert len(phases) == steps and {len(p) for p in phases} == {100 // steps}
        assert sum(phases, ()) == order
    with pytest.raises(ValueError, match="10, 20, 50"):
        cil.cifar100_phases(5)


def test_cifar100_for_class_incremental_keeps_raw_names(raw, checksums_bypassed):
    root, _ = raw
    source = cil.cifar100_source(root, "test")
    assert source.class_names[1] == "aquarium_fish" and source.templates == ("a bad photo of a {}.",)
    first = source.restrict_to_classes(cil.cifar100_phases(10)[0])
    assert set(first.labels) == set(cil.CIFAR100_CLASS_ORDER[:10]) and len(first) == 10
    assert first[0][1] in cil.CIFAR100_CLASS_ORDER[:10]
