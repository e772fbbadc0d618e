"""The paper's benchmarks as pipelines, on raw data the tests write in the formats users download:
a coco_mst-shaped run end to end (check, prepare shards, DataLoader training, evaluation suite,
reports), resumable with --only-missing-outputs, and its input checks before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from project_helpers import make_project, mlflow_runs, run_folders, run_pipeline, store_uri
from realdata_fixtures import (
    write_coco2014, write_eurosat, write_flickr30k, write_image_folder, write_img2dataset_pairs,
)

TASKS = tuple(f"task_{k}" for k in range(1, 9))


def _raw_data(root: Path) -> dict:
    coco = write_coco2014(root / "coco2014")
    flickr = write_flickr30k(root / "flickr30k")
    write_image_folder(root / "zero_shot", {"apple": 2, "bear": 2, "cloud": 2})
    return {
        "coco_root": str(coco.root), "coco_karpathy_json": str(coco.karpathy_json),
        "flickr_root": str(flickr.root),
        "zero_shot": {"kind": "image_folder", "root": str(root / "zero_shot"), "class_map": None},
    }


def _benchmark_parameters(data: dict, workers: int) -> dict:
    return {
        "data": data,
        "preparation": {"num_workers": 0, "max_bad_images": 1},
        "loader": {"num_workers": workers, "persistent_workers": workers > 0},
        "model": {"architecture": "clip-continual-micro", "pretrained": None},
        "continual_learning": {"training": {"steps": 2, "epochs": None, "batch_size": 8,
                                            "precision": "fp32", "progress": False}},
        "evaluation": {"batch_size": 64},
    }


def _coco_project(tmp_path: Path, workers: int) -> tuple[Path, dict]:
    project = make_project(tmp_path / "project")
    data = _raw_data(tmp_path / "raw")
    local = project / "conf" / "local" / "parameters_coco_mst.yml"
    local.write_text(yaml.safe_dump({"coco_mst": _benchmark_parameters(data, workers)}))
    return project, data


@pytest.mark.parametrize("workers, method", [(0, "vr_lwf"), (2, "agem")])
def test_coco_mst_runs_end_to_end_through_the_dataloader_and_resumes(tmp_path, workers, method):
    """With DataLoader workers, agem: CL-CLIP's replay of LAION pairs (img2dataset's layout)
    plus a memory of each finished phase's training crops, read through the loader."""
    project, data = _coco_project(tmp_path, workers)
    if method == "agem":
        write_img2dataset_pairs(tmp_path / "raw" / "laion", 12)
        local = project / "conf" / "local" / "parameters_coco_mst.yml"
        local.write_text(yaml.safe_dump({"coco_mst": {**_benchmark_parameters(data, workers), "reference": {
            "pairs": str(tmp_path / "raw" / "laion"), "size": 8}}}))
    run_pipeline(project, ["coco_mst"], params={"method": method})

    prepared = project / "data" / "04_feature"
    manifests = {p.name: json.loads((p / "manifest.json").read_text()) for p in prepared.iterdir()}
    assert set(manifests) == {"coco_train", "coco_test", "zero_shot", "coco_retrieval", "flickr_retrieval"}
    assert manifests["coco_train"]["count"] == 160 and len(manifests["coco_train"]["class_names"]) == 80
    assert all(m["bad_images"] == 0 for m in manifests.values())
    assert list(prepared.glob("coco_train/shard-*.tar"))

    table = pd.read_csv(project / "data" / "08_reporting" / "continual_metrics.csv")
    assert table["step"].tolist() == list(range(9))
    assert table[["ut_acc", "zs_acc", "i2t_r1", "t2i_r10"]].notna().all().all()
    (folder,) = run_folders(project, "07_model_output", benchmark="coco_mst")
    evaluation = json.loads((folder / "task_8_evaluation.json").read_text())
    assert {"zs_acc/prepared_zero_shot", "retrieval/prepared_flickr_retrieval/i2t_r1"} <= set(evaluation)
    assert evaluation["i2t_r1"] == evaluation["retrieval/prepared_coco_retrieval/i2t_r1"]
    summary = json.loads((folder / "task_3_training.json").read_text())
    assert summary["num_images"] == 20 and summary["steps"] == 2  # 10 classes x 2 train crops
    (run,) = mlflow_runs(store_uri(project))
    assert run.info.status == "FINISHED" and run.data.metrics["data/coco_train/images"] == 160
    # Each number once: the first retrieval set is the headline ``retrieval/<recall>``.
    assert {"retrieval/t2i_r1", "retrieval/prepared_flickr_retrieval/t2i_r1"} <= set(run.data.metrics)
    assert not any(name.startswith(("retrieval/prepared_coco", "continual/retrieval")) for name in run.data.metrics)
    if method == "agem":
        with np.load(folder / "task_3_method_state.npz") as memory:  # each finished phase's crops
            assert len(memory["memory_tokens"]) == len(memory["memory_labels"]) > 0
            assert len(np.unique(memory["memory_tasks"])) == 3 and memory["memory_labels"].max() < 30
        return

    # An interrupted sequence: the last two tasks lost; the prepared shards stay as they are.
    (models,) = run_folders(project, "06_models", benchmark="coco_mst")
    shard_times = {p: p.stat().st_mtime_ns for p in prepared.glob("*/shard-*.tar")}
    kept = (models / "task_6.pt").stat().st_mtime_ns
    for task in ("task_7", "task_8"):
        (models / f"{task}.pt").unlink()
        (folder / f"{task}_evaluation.json").unlink()
    run_pipeline(project, ["coco_mst"], only_missing_outputs=True)
    assert (models / "task_8.pt").is_file() and (models / "task_6.pt").stat().st_mtime_ns == kept
    assert {p: p.stat().st_mtime_ns for p in prepared.glob("*/shard-*.tar")} == shard_times


def test_coco_ost_and_eurosat_mst_run_end_to_end_sharing_the_prepared_splits(tmp_path):
    """Also the methods that read training images themselves, on images read from the shards:
    icarl's exemplars (coco_ost) and ewc's Fisher (eurosat_mst)."""
    project, data = _coco_project(tmp_path, 0)
    write_eurosat(tmp_path / "raw" / "eurosat", 4)
    eurosat = {**data, "eurosat_root": str(tmp_path / "raw" / "eurosat"), "eurosat_test_per_class": 2}
    local = project / "conf" / "local" / "parameters_more.yml"
    local.write_text(yaml.safe_dump({"coco_ost": _benchmark_parameters(data, 0),
                                     "eurosat_mst": _benchmark_parameters(eurosat, 0)}))
    run_pipeline(project, ["coco_ost"], params={"method": "icarl"})
    prepared = project / "data" / "04_feature"
    shared = {p: p.stat().st_mtime_ns for p in prepared.glob("*retrieval/shard-*.tar")}
    run_pipeline(project, ["eurosat_mst"], params={"method": "ewc"})

    assert {p: p.stat().st_mtime_ns for p in prepared.glob("*retrieval/shard-*.tar")} == shared
    eurosat_train = json.loads((prepared / "eurosat_train" / "manifest.json").read_text())
    assert eurosat_train["count"] == sum(4 + k % 3 - 2 for k in range(10))
    assert eurosat_train["class_names"][2] == "herbaceous vegetation"
    table = pd.read_csv(project / "data" / "08_reporting" / "continual_metrics.csv")
    assert table["task"].tolist() == ["pretrained", *(f"task_{k}" for k in range(1, 6))]
    (coco_ost,) = run_folders(project, "07_model_output", benchmark="coco_ost")
    summary = json.loads((coco_ost / "task_1_training.json").read_text())
    assert summary["num_images"] == 160 and summary["final_losses"]["icarl_image"] > 0
    with np.load(coco_ost / "task_1_method_state.npz") as memory:  # 2 crops per class, 20 allowed
        assert memory["memory_images"].shape == (160, 16, 16, 3)  # the micro model's resolution
        assert np.bincount(memory["memory_labels"]).tolist() == [2] * 80
    (eurosat_mst,) = run_folders(project, "07_model_output", benchmark="eurosat_mst")
    assert json.loads((eurosat_mst / "task_2_training.json").read_text())["final_losses"]["ewc"] > 0
    with np.load(eurosat_mst / "task_1_method_state.npz") as fisher:
        assert "fisher:visual.proj" in fisher.files and fisher["fisher:visual.proj"].max() > 0


def test_coco_mst_checks_its_inputs_before_any_work(tmp_path):
    project, data = _coco_project(tmp_path, 0)
    (Path(data["coco_root"]) / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(Exception, match="instances_val2014.json"):
        run_pipeline(project, ["coco_mst"])
    assert not (project / "data" / "04_feature").exists() or not any((project / "data" / "04_feature").iterdir())
    (run,) = mlflow_runs(store_uri(project))
    assert run.info.status == "FAILED"
