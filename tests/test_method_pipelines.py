"""RKR, MoE-Adapters and ZSCL run one short task through the Kedro pipeline (micro model)."""

from __future__ import annotations

import json

import pytest
import torch

from project_helpers import copy_project, run_folders, run_pipeline

# Small MoE settings keep the run to seconds; every other value is the conf default.
OPTIONS = {"rkr": {}, "moe_adapters": {"experts": 4, "bottleneck": 8, "ddas": True, "ddas_steps": 5},
           "zscl": {"average_every": 1}}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_method_runs_one_task_through_the_pipeline(finished, tmp_path, method):
    from clip_continual.adapters import adapter_recipe
    from clip_continual.io import CheckpointDataset

    project = copy_project(finished, tmp_path / "project")
    run_pipeline(project, ["digits_ost"], params={
        "method": method, "continual_learning": {"methods": {method: OPTIONS[method]}},
    })
    (models,) = run_folders(project, benchmark="digits_ost")
    (outputs,) = run_folders(project, "07_model_output", benchmark="digits_ost")
    summary = json.loads((outputs / "task_1_training.json").read_text())
    assert summary["method"] == method and summary["wall_time_s"] > 0
    model = CheckpointDataset(filepath=str(models / "task_1.pt")).load()
    pretrained = CheckpointDataset(filepath=str(project / "data" / "06_models" / "pretrained_model.pt")).load()
    total = sum(p.numel() for p in pretrained.model.parameters())
    if method == "zscl":
        assert adapter_recipe(model.model) is None and summary["trainable_parameters"] == total
        assert {"zscl_image", "zscl_text", "l2"} <= set(summary["final_losses"])
    else:  # the checkpoint loads back adapted, with the backbone of the pretrained model
        assert adapter_recipe(model.model)["kind"] == {"rkr": "rkr", "moe_adapters": "moe"}[method]
        assert 0 < summary["trainable_parameters"] < total
        plain = pretrained.model.state_dict()
        adapted = model.model.state_dict()
        assert torch.equal(adapted["token_embedding.weight"], plain["token_embedding.weight"])
    evaluation = json.loads((outputs / "task_1_evaluation.json").read_text())
    assert 0.0 <= evaluation["zs_acc"] <= 1.0
