"""The parameter-efficient methods, ZSCL and the methods solved or unified outside the gradient
loop (RAIL, ConDU) run through the Kedro pipeline on the micro model (a file of their own, so that
the suite's workers share the method runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from project_helpers import copy_project, run_folders, run_pipeline


@pytest.fixture(scope="module")
def project(finished, tmp_path_factory):
    return copy_project(finished, tmp_path_factory.mktemp("adapted") / "project")


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
