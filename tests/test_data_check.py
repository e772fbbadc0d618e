"""`kedro data check`: one line per dataset, counts against the published ones, pinned split
lists, free disk space; the cheap part before `kedro run`. Index level only, so it is fast."""

from __future__ import annotations

import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

import mtil_fixtures as fx
from clip_continual.cli import cli
from clip_continual.data import check
from clip_continual.data.mtil import ORDER_I
from clip_continual.runtime.data_commands import check_before_run
from realdata_fixtures import write_eurosat

MTIL_RAWS = [f"mtil_{key}_{split}" for key in ORDER_I for split in ("train", "test")]


@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtil")
    fx.write_mtil_raw(root)
    return root


def test_every_mtil_dataset_gets_one_line_with_its_counts_against_zscls(mtil_root, monkeypatch, tmp_path):
    fx.accept_unofficial_checksums(monkeypatch)
    started = time.perf_counter()
    lines = check.check_benchmark(MTIL_RAWS, {"root": str(mtil_root)}, tmp_path / "prepared")
    assert time.perf_counter() - started < 10
    assert [line.dataset for line in lines] == [*ORDER_I, "disk"]
    dtd = next(line for line in lines if line.dataset == "dtd")
    assert not dtd.ok and "test has " in dtd.text and "published 1880" in dtd.text
    assert "kedro data fetch --dataset dtd" in dtd.text
    cars = next(line for line in lines if line.dataset == "stanford_cars")
    assert "Kaggle" in cars.text  # no automatic download: the manual steps


def test_a_dataset_with_the_published_counts_is_ok_and_a_changed_pinned_split_is_not(mtil_root, monkeypatch):
    fx.accept_unofficial_checksums(monkeypatch)
    need = check.needs(["mtil_eurosat_train", "mtil_eurosat_test"], {"root": str(mtil_root)})[0]
    counts = check.COUNTERS["eurosat"](need)
    table = {("eurosat", s): check.Published(counts[s], counts[f"classes:{s}"], 6, "fixture") for s in ("train", "test")}
    monkeypatch.setattr(check, "published_counts", lambda: table)
    monkeypatch.setattr(check, "pinned_splits", dict)  # the fixture's few files are not the real list
    line = check.check_dataset(need)
    assert line.ok and "train 24, test 6" in line.text and "split lists sha256" in line.text
    monkeypatch.setattr(check, "pinned_splits", lambda: {("eurosat", "test"): (6, "0" * 64)})
    line = check.check_dataset(need)
    assert not line.ok and "test file list differs from the pinned one" in line.text


def test_the_real_eurosat_file_names_give_the_pinned_splits(tmp_path):
    """EuroSAT RGB's files are <Class>/<Class>_<n>.jpg; both derived splits of the real names (the
    paper's last 500 per class, ZSCL's seeded 80/20) must equal the pinned lists."""
    counts = {"AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500, "Industrial": 2500,
              "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000, "River": 2500, "SeaLake": 3000}
    folder = tmp_path / "eurosat" / "2750"
    for name, count in counts.items():
        (folder / name).mkdir(parents=True)
        for n in range(1, count + 1):
            (folder / name / f"{name}_{n}.jpg").touch()
    paper = check.check_dataset(check.needs(["eurosat_train", "eurosat_test"], {"eurosat_root": str(folder)})[0])
    mtil = check.check_dataset(check.needs(["mtil_eurosat_train", "mtil_eurosat_test"], {"root": str(tmp_path)})[0])
    assert paper.ok, paper.text
    assert "differs from the pinned" not in mtil.text, mtil.text


def test_the_papers_eurosat_is_counted_per_class(tmp_path):
    fixture = write_eurosat(tmp_path / "eurosat" / "2750", counts=3)
    need = check.needs(["eurosat_train", "eurosat_test"], {"eurosat_root": str(fixture.root),
                                                            "eurosat_test_per_class": 1})[0]
    line = check.check_dataset(need)
    assert not line.ok and "class:Pasture has" in line.text and "published 2000" in line.text
    assert "published 27000" in line.text and "test has 10, published 5000" in line.text


def test_the_cheap_check_names_every_missing_folder(tmp_path):
    data = {"root": str(tmp_path / "empty")}
    with pytest.raises(check.DataCheckError, match=r"dtd: no folder at '.*dtd'.*kedro data fetch --dataset dtd"):
        check.require_present(["mtil_dtd_test", "mtil_food_test"], data)


def test_preparation_is_estimated_from_the_published_counts(mtil_root, tmp_path):
    """What ``kedro run``'s disk check and ``kedro data check`` count for preparation."""
    needs = check.needs(["mtil_food_train", "mtil_food_test"], {"root": str(mtil_root)})
    assert round(check.preparation_bytes(needs, tmp_path / "prepared") / 1024 ** 3, 1) == 3.9
    (tmp_path / "prepared" / "mtil_food_train").mkdir(parents=True)
    (tmp_path / "prepared" / "mtil_food_train" / "manifest.json").write_text("{}")
    assert round(check.preparation_bytes(needs, tmp_path / "prepared") / 1024 ** 3, 1) < 1.5  # test split only


def test_kedro_run_checks_the_folders_before_its_first_node(tmp_path):
    params = {"eurosat_mst": {"data": {"eurosat_root": str(tmp_path / "nowhere"), "coco_root": str(tmp_path),
                                       "flickr_root": str(tmp_path), "zero_shot": {"kind": "image_folder", "root": str(tmp_path)}}}}
    with pytest.raises(check.DataCheckError, match="eurosat_rgb: no folder at"):
        check_before_run(params, ["eurosat_mst"], tmp_path)
    check_before_run(params, ["digits_mst"], tmp_path)  # the embedded default reads no files


def test_the_data_check_command_prints_a_line_per_dataset(tmp_path):
    fixture = write_eurosat(tmp_path / "2750", counts=2)
    overrides = (f"eurosat_mst.data.eurosat_root={fixture.root},eurosat_mst.data.coco_root={tmp_path / 'coco'},"
                 f"eurosat_mst.data.flickr_root={tmp_path / 'flickr'},eurosat_mst.data.zero_shot.root={tmp_path / 'in'}")
    result = CliRunner().invoke(cli, ["data", "check", "--pipeline", "eurosat_mst", "--params", overrides])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["eurosat_rgb", "imagenet_tiered_test", "coco2014", "flickr30k", "disk"]
    assert lines[1].startswith("FAIL") and "image-net.org" in lines[1]
    assert Path(str(fixture.root)).is_dir()
