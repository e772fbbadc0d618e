"""Every method added for the comparison runs through the Kedro pipeline on the micro model, and
a method's state (here iCaRL's exemplar memory) is a catalog artifact a resumed run continues from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from project_helpers import copy_project, run_folders, run_pipeline

METHODS = ("geodl", "imm", "wise_ft", "ewc", "agem", "gem", "icarl")
ICARL = {"method": "icarl", "continual_learning": {"methods": {"icarl": {"per_class": 3, "budget": 10}}}}
# Seconds, not minutes: EWC's Fisher from a few images.
OPTIONS = {"ewc": {"continual_learning": {"methods": {"ewc": {"fisher_samples": 4}}}}}


@pytest.fixture(scope="module")
def project(finished, tmp_path_factory):
    return copy_project(finished, tmp_path_factory.mktemp("methods") / "project")


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_one_task_through_the_pipeline(project, method):
    run_pipeline(project, ["digits_ost"], params={"method": method, **OPTIONS.get(method, {})})
    (folder,) = [f for f in run_folders(project, benchmark="digits_ost") if f.name.startswith(f"{method}-")]
    outputs = project / "data" / "07_model_output" / "digits_ost" / folder.name
    assert (folder / "task_1.pt").is_file() and (outputs / "task_1_method_state.npz").is_file()
    summary = json.loads((outputs / "task_1_training.json").read_text())
    assert summary["method"] == method and np.isfinite(summary["final_losses"]["loss"])


def test_icarl_memory_is_handed_on_within_budget_and_a_resumed_run_continues_exactly(project):
    run_pipeline(project, ["digits_mst"], params=ICARL)
    (folder,) = [f for f in run_folders(project, "07_model_output") if f.name.startswith("icarl-")]
    sizes = []
    for task in range(1, 6):
        with np.load(folder / f"task_{task}_method_state.npz", allow_pickle=False) as state:
            sizes.append(len(state["memory_labels"]))
            assert set(state["memory_labels"].tolist()) == set(range(2 * task))
    assert sizes == [6, 8, 6, 8, 10]  # min(3, 10 // classes) of each seen class
    final_state = (folder / "task_5_method_state.npz").read_bytes()
    models = project / "data" / "06_models" / "digits_mst" / folder.name
    final_model = torch.load(models / "task_5.pt", weights_only=True)["state_dict"]

    for task in ("task_4", "task_5"):  # an interrupted run: the last two tasks are missing
        (models / f"{task}.pt").unlink()
        for suffix in ("_method_state.npz", "_training.json", "_evaluation.json"):
            (folder / f"{task}{suffix}").unlink()
    run_pipeline(project, ["digits_mst"], params=ICARL, only_missing_outputs=True)
    assert (folder / "task_5_method_state.npz").read_bytes() == final_state
    resumed = torch.load(models / "task_5.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], final_model[k]) for k in final_model)


# The parameter-efficient methods and ZSCL; small MoE settings keep it to seconds (DDAS's AlexNet
# needs 31 px, the micro CLIP has 16: tests/test_ddas.py covers it).
ADAPTED_OPTIONS = {"rkr": {}, "moe_adapters": {"experts": 4, "bottleneck": 8, "ddas": False},
                   "zscl": {"average_every": 1}, "diki": {}, "dpw": {}}


@pytest.mark.parametrize("method", sorted(ADAPTED_OPTIONS))
def test_adapters_and_zscl_run_one_task_through_the_pipeline(project, method):
    from clip_continual.model.adapters import adapter_recipe
    from clip_continual.io import CheckpointDataset

    matrix = project / "data" / "08_reporting" / "accuracy_matrix.csv"
    matrix.unlink(missing_ok=True)
    run_pipeline(project, ["digits_ost"], params={
        "method": method, "continual_learning": {"methods": {method: ADAPTED_OPTIONS[method]}},
    })
    rows = matrix.read_text().splitlines()  # this run's accuracy matrix: the start model, then task 1
    assert [row.split(",")[0] for row in rows[1:]] == ["pretrained", "task_1"]
    (models,) = [f for f in run_folders(project, benchmark="digits_ost") if f.name.startswith(f"{method}-")]
    outputs = project / "data" / "07_model_output" / "digits_ost" / models.name
    summary = json.loads((outputs / "task_1_training.json").read_text())
    assert summary["method"] == method and summary["wall_time_s"] > 0
    model = CheckpointDataset(filepath=str(models / "task_1.pt")).load()
    (start,) = (project / "data" / "06_models" / "pretrained").glob("*/model.pt")  # its source-key folder
    pretrained = CheckpointDataset(filepath=str(start)).load()
    total = sum(p.numel() for p in pretrained.model.parameters())
    if method == "zscl":
        assert adapter_recipe(model.model) is None and summary["trainable_parameters"] == total
        assert {"zscl_image", "zscl_text", "l2"} <= set(summary["final_losses"])
    else:  # the checkpoint loads back adapted, with the backbone of the pretrained model
        assert adapter_recipe(model.model)["kind"] == {"rkr": "rkr", "moe_adapters": "moe"}.get(method, method)
        assert 0 < summary["trainable_parameters"] < total
        plain, adapted = pretrained.model.state_dict(), model.model.state_dict()
        assert torch.equal(adapted["token_embedding.weight"], plain["token_embedding.weight"])
    evaluation = json.loads((outputs / "task_1_evaluation.json").read_text())
    assert 0.0 <= evaluation["zs_acc"] <= 1.0
