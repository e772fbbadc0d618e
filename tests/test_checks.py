"""Checks before a run: parameters against conf/base, the start model's source, writable outputs.
A bad setting fails in seconds with one message, before any node has written anything."""

from __future__ import annotations

import copy
import warnings

import pytest

from clip_continual.runtime.schema import ParameterError, check_parameters
from project_helpers import REPO_ROOT, copy_project, file_state, make_project, mlflow_runs, run_pipeline, store_uri


@pytest.fixture(scope="module")
def defaults():
    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base",
                                      default_run_env="base")["parameters"])


def _changed(defaults, dotted: str, value):
    params = copy.deepcopy(defaults)
    *parents, leaf = dotted.split(".")
    target = params
    for key in parents:
        target = target[key]
    target[leaf] = value
    return params


def test_the_defaults_pass(defaults):
    check_parameters(defaults, defaults)


@pytest.mark.parametrize("dotted, suggestion", [
    ("metod", "'method'"),                                        # top level
    ("continual_learning.alpah", "'continual_learning.alpha'"),   # a block
    ("evaluation.batchsize", "'evaluation.batch_size'"),
    ("continual_learning.training.lrr", "'continual_learning.training.lr'"),  # nested block
    ("pretraining.stepz", "'pretraining.steps'"),
])
def test_a_typo_at_any_level_is_refused_with_a_suggestion(defaults, dotted, suggestion):
    with pytest.raises(ParameterError) as error:
        check_parameters(_changed(defaults, dotted, 1), defaults)
    message = str(error.value)
    assert f"unknown parameter '{dotted}'" in message
    assert f"did you mean {suggestion}" in message
    assert "known keys" in message and "--params" in message


@pytest.mark.parametrize("dotted, value, expected", [
    ("continual_learning.training.lr", float("inf"), "must be finite"),
    ("continual_learning.training.lr", "nan", "must be finite"),
    ("pretraining.betas", [0.9, float("nan")], "must be finite"),
    ("continual_learning.training.lr", -1, "lr must be a positive, finite number"),
    ("pretraining.steps", 0, "pretraining.steps must be >= 1"),
    ("evaluation.batch_size", 0, "'evaluation.batch_size' must be an integer >= 1"),
    ("data_preparation.digits.test_fraction", 1.5, "between 0 and 1"),
    ("vocabulary_replay.mode", "bogus", "unknown vocabulary mode 'bogus'"),
    ("continual_learning", 3, "'continual_learning' must be a block of settings"),
    ("pretraining.enabled", "no", "'pretraining.enabled' must be true or false"),
    ("pretraining.sparse_token_embedding", "yes", "'pretraining.sparse_token_embedding' must be true or false"),
])
def test_non_finite_wrongly_typed_and_out_of_range_values_are_refused(defaults, dotted, value, expected):
    with pytest.raises(ParameterError, match="invalid parameters") as error:
        check_parameters(_changed(defaults, dotted, value), defaults)
    assert expected in str(error.value)


def test_a_named_benchmark_takes_any_method_option_for_itself(defaults):
    from clip_continual.runtime.benchmarks import BENCHMARKS
    from clip_continual.runtime.recipe import resolve_recipe

    params = copy.deepcopy(defaults)
    params["method"] = "icarl"
    params["coco_ost"]["continual_learning"]["methods"] = {"ewc": {"penalty": 10.0, "training": {"lr": 1e-3}}}
    check_parameters(params, defaults)
    ewc = resolve_recipe(BENCHMARKS["coco_ost"], params, "ewc").tasks[0].settings
    assert (ewc["method.penalty"], ewc["training.lr"]) == (10.0, 1e-3)
    icarl = resolve_recipe(BENCHMARKS["mtil_order1"], params, "icarl").tasks[0].settings
    assert icarl["method.budget"] == 10000  # ZSCL's, over the class's default
    for dotted, value, expected in [
        ("mtil_order1.continual_learning.methods.icarl.budgte", 3, "did you mean 'mtil_order1.continual_learning.methods.icarl.budget'"),
        ("mtil_order1.continual_learning.methods.icarl.budget", -3,
         "'mtil_order1.continual_learning.methods.icarl.budget' (task aircraft): budget must be"),
    ]:
        with pytest.raises(ParameterError) as error:
            check_parameters(_changed(params, dotted, value), defaults)
        assert expected in str(error.value)


@pytest.mark.parametrize("dotted, overrides", [
    ("mtil_order1.continual_learning.methods.zscl.training.lr", None),
    ("mtil_order1.continual_learning.task_training.aircraft.lr", None),
    ("mtil_order1.continual_learning.training.lr", {"mtil_order1": {"continual_learning": {"training": {"lr": -1}}}}),
])
def test_a_benchmark_setting_out_of_range_is_named_by_its_full_key(defaults, dotted, overrides):
    params = copy.deepcopy(defaults)
    *parents, leaf = dotted.split(".")
    target = params
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = -1
    params["method"] = "zscl"
    params["runtime_overrides"] = overrides or {}
    with pytest.raises(ParameterError) as error:
        check_parameters(params, defaults)
    where = f"--params {dotted}" if overrides else dotted
    assert f"'{where}' (task " in str(error.value) and "lr must be a positive" in str(error.value)


def test_user_keyed_blocks_take_new_keys(defaults):
    params = _changed(defaults, "prompts.cars", "a photo of a {}")
    params["continual_learning"]["training"]["method_options"] = {"label_smoothing": 0.1}
    check_parameters(params, defaults)


def test_the_model_source_is_checked_up_front(tmp_path):
    from clip_continual.model.checkpoints import CheckpointError, save_checkpoint
    from clip_continual.model.clip import ModelSpec
    from clip_continual.model.sources import (
        PretrainedWeightsUnavailable, UnknownArchitectureError, build_model, check_model_source,
    )

    with pytest.raises(UnknownArchitectureError, match="unknown CLIP architecture 'ViT-Q-99'"):
        check_model_source(ModelSpec("ViT-Q-99"))
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        check_model_source(ModelSpec("clip-continual-micro", str(tmp_path / "missing.pt")))
    micro = tmp_path / "micro.pt"
    save_checkpoint(build_model(ModelSpec("clip-continual-micro")), micro)
    check_model_source(ModelSpec("clip-continual-micro", str(micro)))
    for check in (check_model_source, build_model):
        with pytest.raises(CheckpointError) as error:
            check(ModelSpec("clip-continual-tiny", str(micro)))
        assert "holds a clip-continual-micro checkpoint" in str(error.value)
        assert "requested architecture is clip-continual-tiny" in str(error.value)


# --- in a project: refused before any node runs -------------------------------------------------

@pytest.fixture
def project(finished, tmp_path):
    return copy_project(finished, tmp_path / "project")


def _data_files(project) -> dict:
    return {p: file_state(p) for p in sorted((project / "data").rglob("*")) if p.is_file()}


def test_a_typo_stops_the_run_before_anything_is_written(project):
    before = _data_files(project)
    with pytest.raises(ParameterError, match="did you mean 'continual_learning.alpha'"):
        run_pipeline(project, params={"continual_learning": {"alpah": 0.5}})
    assert _data_files(project) == before
    assert mlflow_runs(store_uri(project)) == []


def test_a_wrong_architecture_checkpoint_leaves_the_original_intact(project):
    (original,) = (project / "data" / "06_models" / "pretrained").glob("*/model.pt")
    weights = project / "tiny.pt"
    weights.write_bytes(original.read_bytes())
    before = _data_files(project)
    with pytest.raises(Exception) as error:
        run_pipeline(project, params={"model": {"architecture": "clip-continual-tiny", "pretrained": str(weights)},
                                      "pretraining": {"enabled": False}})
    assert "holds a clip-continual-micro checkpoint" in str(error.value)
    assert "requested architecture is clip-continual-tiny" in str(error.value)
    assert _data_files(project) == before  # the original checkpoint byte for byte, nothing new
    assert mlflow_runs(store_uri(project)) == []


def test_a_pipeline_whose_inputs_are_not_made_yet_names_them_and_the_command_that_makes_them(project):
    """digits_ost starts from the default pipeline's start model; another seed names another
    one, not made yet: refused before any node, with no MLflow run opened."""
    from clip_continual.runtime.preflight import PreflightError

    before = _data_files(project)
    with pytest.raises(PreflightError) as error:
        run_pipeline(project, ["digits_ost"], params={"seed": 7})
    message = str(error.value)
    assert message.startswith("digits_ost reads 1 file(s) that no node of the run makes"), message
    assert "pretrained_model (" in message and "They are made by `kedro run --pipelines pretraining`" in message
    assert _data_files(project) == before
    assert mlflow_runs(store_uri(project)) == []
    # Pretraining alone on a project without data: the data preparation makes all it reads.
    fresh = make_project(project.parent / "fresh")
    with pytest.raises(PreflightError, match=r"They are made by `kedro run --pipelines data_preparation`"):
        run_pipeline(fresh, ["pretraining"])
    assert not (fresh / "data").exists() or not any((fresh / "data").rglob("*.npz"))


def test_an_unwritable_output_is_refused_before_the_run(project):
    import shutil

    from clip_continual.runtime.preflight import PreflightError

    reporting = project / "data" / "08_reporting"
    shutil.rmtree(reporting)
    reporting.write_text("a file where the reports folder belongs")
    before = _data_files(project)
    with pytest.raises(PreflightError, match="08_reporting' is a file where a folder is needed"):
        run_pipeline(project, ["digits_mst"])
    assert _data_files(project) == before


def test_divergence_advice_fits_the_precision():
    from clip_continual.training.loop import divergence_message

    on_cpu = divergence_message({"loss": float("nan")}, step=3, task_index=1, precision="fp32")
    assert "lower continual_learning.training.lr" in on_cpu and "precision" not in on_cpu
    assert "precision=fp32" in divergence_message({"loss": float("nan")}, step=3, task_index=1, precision="bf16")
