"""Checkpoints in our format, ZSCL's and MoE-Adapters' load into the model they were written
from (same features, same accuracy); a pickled model loads only when the user opts in; and
``evaluate_checkpoints`` rebuilds a training run's accuracy matrix from its checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from clip_continual.data.common import ImageSet
from clip_continual.evaluation.zero_shot import zero_shot_accuracy
from clip_continual.model.adapters import add_adapters
from clip_continual.model.checkpoint_formats import ReadOptions, load_any_checkpoint
from clip_continual.model.checkpoints import CheckpointError, save_checkpoint
from clip_continual.model.clip import encode_images

from project_helpers import copy_project, run_pipeline

MOE_RECIPE = {"kind": "moe", "experts": 3, "top_k": 2, "bottleneck": 8, "routers": 2, "towers": ["visual", "text"],
              "ddas": False, "ddas_tasks": 0, "ddas_reference": 0}
UPSTREAM_ROUTERS = 11  # MoE-Adapters mtil/clip/model.py:336 (one router per MTIL task)


@pytest.fixture(scope="module")
def images(micro):
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, size=(24, micro.image_size, micro.image_size, 3), dtype=np.uint8)
    return ImageSet(pixels, generator.integers(0, 4, size=24), ("circle", "square", "star", "ring"))


def _changed(micro, recipe=None):
    """A copy of ``micro`` whose weights (and adapters) differ from it, held exactly in half
    precision (as ZSCL's files hold them)."""
    model = micro.clone()
    if recipe:
        add_adapters(model.model, recipe)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.model.parameters():
            parameter.copy_((parameter + torch.randn_like(parameter) * 0.2).half().float())
    return model.model.eval() and model


def _same_model(loaded, source, template, images):
    pixels = source.preprocess(images.images[:8], "cpu")
    with torch.no_grad():
        expected = encode_images(source.model.eval(), pixels)
        assert torch.allclose(encode_images(loaded.model.eval(), pixels), expected, atol=1e-6)
        assert not torch.allclose(encode_images(template.model.eval(), pixels), expected, atol=1e-3)
    accuracy = [zero_shot_accuracy(m, images, ["a {}."], 24, "cpu") for m in (loaded, source)]
    assert accuracy[0] == accuracy[1]


def _openai_names(model) -> dict[str, torch.Tensor]:
    """ZSCL's file: OpenAI's CLIP state dict (OpenAI's scalar entries included) in
    ``{"state_dict": ...}`` (ZSCL mtil/src/utils.py:44-47), in half precision as clip.load gives."""
    state = {k: v.half() for k, v in model.model.state_dict().items()}
    return {"state_dict": {**state, "input_resolution": torch.tensor(16), "context_length": torch.tensor(16),
                           "vocab_size": torch.tensor(49408)}}


def _moe_adapters_names(model) -> dict[str, torch.Tensor]:
    """MoE-Adapters' file (mtil/clip/model.py:287-358): experts as ``adaptmlp_list``, 11 routers
    (untrained ones zero), the unused ``ln_3`` / ``mean`` / ``std`` and ``adaptmlp`` (the last expert)."""
    state = {}
    for key, value in model.model.state_dict().items():
        block, _, rest = key.partition(".mixture.")
        if not rest:
            state[key] = value
        elif rest.startswith("experts."):
            _, expert, layer, kind = rest.split(".")
            name = f"{block}.adaptmlp_list.{expert}.{layer}_proj.{kind}"
            state[name] = value
            if int(expert) == MOE_RECIPE["experts"] - 1:
                state[f"{block}.adaptmlp.{layer}_proj.{kind}"] = value
        elif rest.startswith(("gates.", "noise.")):
            state[f"{block}.{'router_list' if rest.startswith('gates') else 'w_noise_list'}.{rest.split('.')[1]}"] = value
    for block in {key.partition(".mixture.")[0] for key in model.model.state_dict() if ".mixture." in key}:
        width = state[f"{block}.ln_1.weight"].shape[0]
        state.update({f"{block}.ln_3.weight": torch.ones(width), f"{block}.ln_3.bias": torch.zeros(width),
                      f"{block}.mean": torch.zeros(1), f"{block}.std": torch.ones(1)})
        for t in range(MOE_RECIPE["routers"], UPSTREAM_ROUTERS):
            for name in ("router_list", "w_noise_list"):
                state[f"{block}.{name}.{t}"] = torch.zeros(width, MOE_RECIPE["experts"])
    return {"state_dict": state}


def test_our_and_zscl_checkpoints_load_as_the_model_they_came_from(micro, images, tmp_path):
    source = _changed(micro)
    save_checkpoint(source, tmp_path / "ours.pt")
    torch.save(_openai_names(source), tmp_path / "zscl.pth")
    for name in ("ours.pt", "zscl.pth"):
        _same_model(load_any_checkpoint(tmp_path / name, micro, step=1), source, micro, images)
    with pytest.raises(CheckpointError, match="evaluate_checkpoints.architecture"):
        load_any_checkpoint(tmp_path / "ours.pt", micro, step=1, options=ReadOptions(architecture="clip-continual-tiny"))


def test_moe_adapters_checkpoint_maps_onto_our_mixtures(micro, images, tmp_path):
    source = _changed(micro, MOE_RECIPE)
    torch.save(_moe_adapters_names(source), tmp_path / "moe.pth")
    loaded = load_any_checkpoint(tmp_path / "moe.pth", micro, step=2)
    assert loaded.model.adapter_recipe["routers"] == 2 and loaded.model.adapter_recipe["experts"] == 3
    _same_model(loaded, source, micro, images)
    with pytest.raises(CheckpointError, match="trained routers of task 2"):
        load_any_checkpoint(tmp_path / "moe.pth", micro, step=1)


def test_a_pickled_model_is_refused_unless_the_user_opts_in(micro, images, tmp_path):
    source = _changed(micro)
    torch.save(source.model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="arbitrary code execution.*allow_pickled_checkpoint: true"):
        load_any_checkpoint(tmp_path / "whole.pt", micro, step=1)
    opted_in = load_any_checkpoint(tmp_path / "whole.pt", micro, step=1, options=ReadOptions(allow_pickled=True))
    _same_model(opted_in, source, micro, images)


def test_evaluate_checkpoints_rebuilds_the_training_runs_accuracy_matrix(finished, tmp_path_factory):
    project = copy_project(finished, tmp_path_factory.mktemp("checkpoints") / "project")
    reports = project / "data" / "08_reporting"
    trained = pd.read_csv(reports / "accuracy_matrix.csv")
    (folder,) = (project / "data" / "06_models" / "digits_mst").iterdir()
    # The second task's model as ZSCL would have saved it: the same rows from another format.
    ours = torch.load(folder / "task_2.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": ours}, project / "task_2_zscl.pth")
    checkpoints = [str(folder / f"task_{k}.pt") for k in range(1, 6)]
    checkpoints[1] = str(project / "task_2_zscl.pth")
    (reports / "accuracy_matrix.csv").unlink()
    run_pipeline(project, ["evaluate_checkpoints"],
                 params={"evaluate_checkpoints": {"checkpoints": checkpoints, "label": "released"}})
    pd.testing.assert_frame_equal(pd.read_csv(reports / "accuracy_matrix.csv"), trained, check_exact=False, atol=1e-6)
    summary = json.loads((reports / "continual_summary.json").read_text())
    assert summary["method"] == "released" and summary["num_tasks"] == 5
