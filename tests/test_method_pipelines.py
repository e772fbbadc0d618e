"""Every method added for the comparison runs through the Kedro pipeline on the micro model, and
a method's state (here iCaRL's exemplar memory) is a catalog artifact a resumed run continues from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlflow.tracking import MlflowClient

from project_helpers import copy_project, mlflow_runs, run_folders, run_pipeline, store_uri

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
    # Its cost: the exemplars it hands on (and its teacher) beside the model.
    summary = json.loads((folder / "task_2_training.json").read_text())
    with np.load(folder / "task_2_method_state.npz", allow_pickle=False) as state:
        assert summary["extra_storage"]["handed_on"] == sum(state[key].nbytes for key in state.files) > 0
    assert summary["extra_storage"]["teacher"] > 0
    final_state = (folder / "task_5_method_state.npz").read_bytes()
    models = project / "data" / "06_models" / "digits_mst" / folder.name
    final_model = torch.load(models / "task_5.pt", weights_only=True)["state_dict"]

    for task in ("task_4", "task_5"):  # an interrupted run: the last two tasks are missing
        (models / f"{task}.pt").unlink()
        for suffix in ("_method_state.npz", "_training.json", "_evaluation.json"):
            (folder / f"{task}{suffix}").unlink()
    run_pipeline(project, ["digits_mst"], params=ICARL, only_missing_outputs=True)
    assert (folder / "task_5_method_state.npz").read_bytes() == final_state
    # The resumed run paid for the tasks it trained again only: their costs alone are its.
    resumed_run = mlflow_runs(store_uri(project))[0]
    paid = MlflowClient(tracking_uri=store_uri(project)).get_metric_history(resumed_run.info.run_id,
                                                                            "cost/wall_time_s")
    assert sorted(point.step for point in paid) == [4, 5]
    resumed = torch.load(models / "task_5.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], final_model[k]) for k in final_model)
