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


# The parameter-efficient methods and ZSCL; small MoE settings keep it to seconds (DDAS's AlexNet
# needs 31 px, the micro CLIP has 16: tests/test_ddas.py covers it).
ADAPTED_OPTIONS = {"rkr": {}, "moe_adapters": {"experts": 4, "bottleneck": 8, "ddas": False},
                   "zscl": {"average_every": 1}, "lora": {"rank": 4}, "diki": {}, "dpw": {}}


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


def test_rail_fits_without_gradient_steps_and_its_classifier_is_evaluated(project):
    """RAIL on the embedded digits, all ten in one task (small expansion: seconds): no optimiser
    step, the accuracy matrix written, the learnt digits classified well above chance (1 in 10)
    and above the starting model, and the checkpoint loads back with its classifier."""
    from clip_continual.io import CheckpointDataset
    from clip_continual.model.adapters import image_classifier

    run_pipeline(project, ["digits_ost"], params={
        "method": "rail", "continual_learning": {"methods": {"rail": {"hidden_dim": 256}}}})
    (models,) = [f for f in run_folders(project, benchmark="digits_ost") if f.name.startswith("rail-")]
    outputs = project / "data" / "07_model_output" / "digits_ost" / models.name
    summary = json.loads((outputs / "task_1_training.json").read_text())
    assert summary["trainable_parameters"] == 0 and summary["epochs"] == 1.0
    rows = json.loads((outputs / "task_1_evaluation.json").read_text())["acc_rows"]
    assert np.asarray(rows).shape == (2, 1) and rows[1][0] > max(0.3, rows[0][0] + 0.1)
    with np.load(outputs / "task_1_method_state.npz", allow_pickle=False) as state:
        assert state["ridge_inverse"].shape == (256, 256)
    model = CheckpointDataset(filepath=str(models / "task_1.pt")).load()
    assert len(image_classifier(model.model).class_names) == 10
def test_condu_runs_one_task_through_the_pipeline_and_hands_on_the_pretrained_weights(project):
    from clip_continual.io import CheckpointDataset
    from clip_continual.model.adapters import adapter_recipe

    run_pipeline(project, ["digits_ost"], params={"method": "condu"})
    (models,) = [f for f in run_folders(project, benchmark="digits_ost") if f.name.startswith("condu-")]
    outputs = project / "data" / "07_model_output" / "digits_ost" / models.name
    model = CheckpointDataset(filepath=str(models / "task_1.pt")).load()
    (start,) = (project / "data" / "06_models" / "pretrained").glob("*/model.pt")
    pretrained = CheckpointDataset(filepath=str(start)).load().model.state_dict()
    recipe = adapter_recipe(model.model)
    assert recipe["kind"] == "condu" and recipe["variant"] == "full" and len(recipe["classes"]) == 1
    state = model.model.state_dict()  # the next task starts from the pretrained weights
    assert all(torch.equal(state[k], pretrained[k]) for k in pretrained)
    assert state["task_experts.unified_0"].abs().sum() > 0  # ...and task 1's delta is kept
    evaluation = json.loads((outputs / "task_1_evaluation.json").read_text())
    assert 0.0 <= evaluation["zs_acc"] <= 1.0 and 0.0 <= evaluation["ut_acc"] <= 1.0
