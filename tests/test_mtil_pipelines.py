"""MTIL and class-incremental CIFAR-100 as users run them: ``kedro run --pipelines mtil_order1``
(and ``cifar100_10steps``) offline on the datasets written in torchvision's layouts, with the
micro model, through preparation (shards), DataLoader training and evaluation, to the reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import mtil_fixtures as fx
from clip_continual.data import class_incremental as cil
from clip_continual.data.mtil import ORDER_I
from project_helpers import make_project, mlflow_runs, run_folders, run_pipeline, store_uri
from realdata_fixtures import write_gather_cc

TINY_TRAINING = {"steps": 1, "epochs": None, "batch_size": 4, "warmup_steps": 0, "precision": "fp32",
                 "progress": False}


# MTIL's two largest template sets (34 x 101 and 18 x 100 prompts) cut to one template to save
# time; the other nine datasets run with ZSCL's own templates (the default).
FEWER_PROMPTS = {"caltech101": ["a photo of a {}."], "cifar100": ["a photo of a {}."]}


def _parameters(root: Path, **continual) -> dict:
    return {
        "data": {"root": str(root), "download": False},
        "preparation": {"num_workers": 0},
        "loader": {"num_workers": 0, "persistent_workers": False},
        "model": {"architecture": "clip-continual-micro", "pretrained": None},
        "continual_learning": {"training": TINY_TRAINING, **continual},
        "evaluation": {"batch_size": 128},
    }


def _project(tmp_path: Path, benchmark: str, **continual) -> Path:
    project = make_project(tmp_path / "project")
    root = tmp_path / "raw"
    fx.write_mtil_raw(root)
    local = project / "conf" / "local" / f"parameters_{benchmark}.yml"
    parameters = _parameters(root, **continual)
    if benchmark.startswith("mtil"):
        parameters["prompts"] = FEWER_PROMPTS
    local.write_text(yaml.safe_dump({benchmark: parameters}))
    return project


def _zscl_metrics(R: np.ndarray) -> dict[str, float]:
    """ZSCL mtil/results.ipynb ``statistics`` on rows 1..T (row 0, the starting model, apart)."""
    after = R[1:]
    transfer = [np.mean([after[j, i] for j in range(i)]) for i in range(1, after.shape[1])]
    return {"transfer": np.mean(transfer), "avg": after.mean(), "last": after[-1].mean()}


def test_mtil_order1_runs_end_to_end_offline(tmp_path, monkeypatch):
    fx.accept_unofficial_checksums(monkeypatch)
    project = _project(tmp_path, "mtil_order1")
    run_pipeline(project, ["mtil_order1"], params={"method": "ft"})

    prepared = project / "data" / "04_feature"
    manifests = {p.name: json.loads((p / "manifest.json").read_text()) for p in prepared.iterdir()}
    assert set(manifests) == {f"mtil_{key}_{split}" for key in ORDER_I for split in ("train", "test")}
    assert manifests["mtil_eurosat_test"]["count"] == 6 and manifests["mtil_eurosat_train"]["count"] == 24  # 80/20
    assert manifests["mtil_caltech101_test"]["class_names"][19] == "side of a car"
    assert manifests["mtil_aircraft_test"]["count"] == 4  # the official test split

    reports = project / "data" / "08_reporting"
    matrix = pd.read_csv(reports / "accuracy_matrix.csv", index_col="after")
    assert matrix.shape == (12, 11) and list(matrix.columns) == list(ORDER_I)
    assert list(matrix.index) == ["pretrained", *ORDER_I]
    summary = json.loads((reports / "continual_summary.json").read_text())
    expected = _zscl_metrics(matrix.to_numpy())
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    table = pd.read_csv(reports / "continual_metrics.csv")
    assert table["step"].tolist() == list(range(12)) and table["transfer"].iloc[-1] == pytest.approx(expected["transfer"])

    (outputs,) = run_folders(project, "07_model_output", benchmark="mtil_order1")
    rates = {key: json.loads((outputs / f"{key}_training.json").read_text())["final_lr"] for key in ORDER_I}
    assert {key for key, lr in rates.items() if lr == pytest.approx(5e-5)} == {"aircraft", "mnist"}
    assert all(lr == pytest.approx(1e-5) for key, lr in rates.items() if key not in ("aircraft", "mnist"))
    assert json.loads((outputs / "food_training.json").read_text())["num_images"] == 6

    (run,) = mlflow_runs(store_uri(project))
    names = {f"continual/{name}" for name in ("acc/sun397", "transfer", "avg", "last")}
    assert run.info.status == "FINISHED" and names <= set(run.data.metrics)
    assert run.data.metrics["continual/last"] == pytest.approx(expected["last"])

    # An interrupted sequence resumes: the lost last task is redone, nothing before it.
    (models,) = run_folders(project, "06_models", benchmark="mtil_order1")
    kept = (models / "stanford_cars.pt").stat().st_mtime_ns
    (models / "sun397.pt").unlink()
    (outputs / "sun397_evaluation.json").unlink()
    run_pipeline(project, ["mtil_order1"], params={"method": "ft"}, only_missing_outputs=True)
    assert (models / "sun397.pt").is_file() and (models / "stanford_cars.pt").stat().st_mtime_ns == kept


def test_cifar100_10steps_runs_end_to_end_in_zscl_class_order(tmp_path, monkeypatch):
    """ZSCL itself, on Conceptual Captions pairs where gather_cc.py leaves them (the default path)."""
    fx.accept_unofficial_checksums(monkeypatch)
    project = _project(tmp_path, "cifar100_10steps")
    write_gather_cc(project / "data" / "01_raw" / "conceptual_captions", 6)
    run_pipeline(project, ["cifar100_10steps"], params={"method": "zscl"})
    (models,) = run_folders(project, "06_models", benchmark="cifar100_10steps")
    from clip_continual.io import CheckpointDataset

    first = CheckpointDataset(filepath=str(models / "task_1.pt")).load()
    assert sorted(first.metadata["classes"]) == sorted(cil.CIFAR100_CLASS_ORDER[:10])
    (outputs,) = run_folders(project, "07_model_output", benchmark="cifar100_10steps")
    steps = [json.loads((outputs / f"{name}_evaluation.json").read_text())
             for name in ["pretrained", *(f"task_{k}" for k in range(1, 11))]]
    summary = json.loads((project / "data" / "08_reporting" / "continual_summary.json").read_text())
    accuracies = [step["cil_acc"] for step in steps[1:]]
    assert summary["avg"] == pytest.approx(np.mean(accuracies)) and summary["last"] == pytest.approx(accuracies[-1])
    assert summary["transfer"] is None and steps[-1]["acc_columns"][0] == "phase_1"
    losses = json.loads((outputs / "task_10_training.json").read_text())["final_losses"]
    assert {"zscl_image", "zscl_text"} <= set(losses) and losses["zscl_image"] > 0
    assert "l2" not in losses  # ZSCL's class-incremental configs: l2 0 (its recipe, kedro recipe)


@pytest.mark.parametrize("name, first_task, tasks", [
    ("mtil_order1", "aircraft", 11), ("mtil_order2", "stanford_cars", 11),
    ("cifar100_10steps", "task_1", 10), ("cifar100_20steps", "task_1", 20), ("cifar100_50steps", "task_1", 50),
])
def test_each_zscl_benchmark_is_a_registered_chain_of_its_tasks(name, first_task, tasks):
    from clip_continual.pipeline_registry import register_pipelines

    pipeline = register_pipelines()[name]
    fine_tunes = sorted(node.name for node in pipeline.nodes if ".fine_tune_" in node.name)
    assert len(fine_tunes) == tasks and f"{name}.{first_task}.fine_tune_{first_task}" in fine_tunes
    evaluations = [node for node in pipeline.nodes if ".evaluate_" in node.name]
    assert len(evaluations) == tasks + 1  # the starting model, then every task
