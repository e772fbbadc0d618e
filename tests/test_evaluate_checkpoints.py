"""Checkpoints in our format, ZSCL's and MoE-Adapters' load into the model they were written
from (same features, same accuracy); a pickled model loads only when the user opts in; and
``evaluate_checkpoints`` scores a released model as the training run did."""

from __future__ import annotations

import dataclasses
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
from clip_continual.model.clip import ModelSpec, encode_images

from mlflow.tracking import MlflowClient

from project_helpers import copy_project, mlflow_runs, run_pipeline, store_uri

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
        if key.startswith("visual.task_selector."):
            continue  # a file of its own (_autochooser)
        if not rest:
            state[key] = value
        elif rest.startswith("experts."):
            _, expert, layer, kind = rest.split(".")
            name = f"{block}.adaptmlp_list.{expert}.{layer}_proj.{kind}"
            state[name] = value
            if int(expert) == MOE_RECIPE["experts"] - 1:
                state[f"{block}.adaptmlp.{layer}_proj.{kind}"] = value
        elif rest.startswith(("gates.", "noise.")):
            name = "router_list" if rest.startswith("gates") else "w_noise_list"
            state[f"{block}.{name}.{rest.split('.')[1]}"] = value
    for block in {key.partition(".mixture.")[0] for key in model.model.state_dict() if ".mixture." in key}:
        width = state[f"{block}.ln_1.weight"].shape[0]
        state.update({f"{block}.ln_3.weight": torch.ones(width), f"{block}.ln_3.bias": torch.zeros(width),
                      f"{block}.mean": torch.zeros(1), f"{block}.std": torch.ones(1)})
        for t in range(MOE_RECIPE["routers"], UPSTREAM_ROUTERS):
            for name in ("router_list", "w_noise_list"):
                state[f"{block}.{name}.{t}"] = torch.zeros(width, MOE_RECIPE["experts"])
    return {"state_dict": state}


def _autochooser(model) -> dict[str, torch.Tensor]:
    """MoE-Adapters' ``<task>_autochooser.pth`` (AutoEncoder.py:196-199): 12 autoencoders,
    0 the reference, i task i's; the untrained ones of later tasks too."""
    selector = model.model.visual.task_selector
    autoencoders = [selector.reference, *selector.autoencoders]
    autoencoders += [type(selector.reference)(selector.features) for _ in range(12 - len(autoencoders))]
    return {"state_dict": {f"{i}.{part}.0.{kind}": getattr(getattr(autoencoder, part), kind)
                           for i, autoencoder in enumerate(autoencoders)
                           for part in ("encoder", "decoder") for kind in ("weight", "bias")}}


def test_our_and_zscl_checkpoints_load_as_the_model_they_came_from(micro, images, tmp_path):
    source = _changed(micro)
    save_checkpoint(source, tmp_path / "ours.pt")
    torch.save(_openai_names(source), tmp_path / "zscl.pth")
    for name in ("ours.pt", "zscl.pth"):
        _same_model(load_any_checkpoint(tmp_path / name, micro, step=1), source, micro, images)
    with pytest.raises(CheckpointError, match="evaluate_checkpoints.architecture"):
        load_any_checkpoint(tmp_path / "ours.pt", micro, 1, ReadOptions(architecture="clip-continual-tiny"))
    # OpenAI's weights read into a GELU model of an architecture open_clip also has with QuickGELU
    gelu = dataclasses.replace(micro, spec=ModelSpec("ViT-B-16"))
    with pytest.raises(CheckpointError, match="QuickGELU.*architecture: ViT-B-16-quickgelu"):
        load_any_checkpoint(tmp_path / "zscl.pth", gelu, step=1)


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


def test_the_checkpoint_list_is_checked_before_any_work(tmp_path):
    from clip_continual.runtime.benchmarks import BENCHMARKS
    from clip_continual.runtime.checkpoint_sequence import CheckpointSequence

    benchmark, present = BENCHMARKS["digits_mst"], tmp_path / "task.pt"
    present.write_bytes(b"")
    for checkpoints, problem in (([], "is empty"), ([str(present)] * 2, "lists 2 files, but digits_mst has 5 tasks"),
                                 ([str(present)] * 4 + [str(tmp_path / "gone.pt")], "no such files")):
        with pytest.raises(ValueError, match=problem):
            CheckpointSequence.from_params({"checkpoints": checkpoints}, benchmark)
    sequence = CheckpointSequence.from_params({"checkpoints": [str(present)] * 5, "allow_pickled_checkpoint": "yes"},
                                              benchmark)
    assert sequence.options.allow_pickled is False  # only a literal true opts in


def test_evaluate_checkpoints_scores_a_released_model_as_the_training_run_did(finished, tmp_path_factory):
    """The default run's last model, saved as ZSCL saves it, on digits_ost's suite (one task of
    all ten digits): its row is the run's plain top-1 over all digits after task 5."""
    project = copy_project(finished, tmp_path_factory.mktemp("checkpoints") / "project")
    (models,) = (project / "data" / "06_models" / "digits_mst").iterdir()
    evaluations = project / "data" / "07_model_output" / "digits_mst" / models.name
    trained = {step: json.loads((evaluations / f"{step}_evaluation.json").read_text())
               for step in ("pretrained", "task_5")}
    ours = torch.load(models / "task_5.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": ours}, project / "released.pth")
    run_pipeline(project, ["evaluate_checkpoints_digits_ost"], params={"evaluate_checkpoints": {
        "checkpoints": [str(project / "released.pth")], "label": "released"}})
    reports = project / "data" / "08_reporting"
    matrix = pd.read_csv(reports / "accuracy_matrix.csv").set_index("after")["task_1"]
    assert matrix.to_dict() == pytest.approx({"pretrained": trained["pretrained"]["ut_top1"],
                                               "task_1": trained["task_5"]["ut_top1"]})
    summary = json.loads((reports / "continual_summary.json").read_text())
    assert summary["method"] == "released" and summary["zs_acc"] == pytest.approx(trained["task_5"]["zs_acc"])
    (run,) = mlflow_runs(store_uri(project))
    assert run.data.tags["method"] == "released" and run.data.tags["benchmark"] == "digits_ost"
    steps = MlflowClient(store_uri(project)).get_metric_history(run.info.run_id, "continual/ut_top1")
    assert [point.step for point in steps] == [0, 1]


def test_moe_adapters_autochooser_beside_a_checkpoint_becomes_our_ddas_selector(tmp_path):
    from clip_continual.model.sources import build_model

    small = build_model(ModelSpec("clip-continual-tiny-p8"))  # DDAS's AlexNet needs 31 px
    source = _changed(small, {**MOE_RECIPE, "ddas": True, "ddas_tasks": 2, "ddas_reference": 1})
    torch.save(_moe_adapters_names(source), tmp_path / "DTD.pth")
    torch.save(_autochooser(source), tmp_path / "DTD_autochooser.pth")
    loaded = load_any_checkpoint(tmp_path / "DTD.pth", small, step=2)
    expected = {k: v for k, v in source.model.state_dict().items() if not k.endswith(("frozen", "usage"))}
    state = loaded.model.state_dict()
    assert len(loaded.model.visual.task_selector.autoencoders) == 2
    assert all(torch.equal(state[key], value) for key, value in expected.items())
