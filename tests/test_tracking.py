"""MLflow tracking: one run per `kedro run`, against temporary SQLite stores only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml
import pytest
from mlflow.tracking import MlflowClient

from clip_continual.evaluation.reporting import COST_COLUMNS
from clip_continual.io import CheckpointDataset
from clip_continual.runtime.results import NoRunsToCompare
from clip_continual.runtime.run_key import compute_run_key
from clip_continual.runtime.tracking import (
    DEFAULT_STORE_FILE, HEARTBEAT_TAG, HOST_TAG, PID_TAG, BatchedMetrics, default_artifact_location,
    final_metric_name, identity_tag, log_metrics, metric_history, parameters_to_log, step_metric_names,
    tracking_uri,
)
from project_helpers import (
    BENCHMARK, REPO_ROOT, TASKS, copy_project, mlflow_runs, run_folders,
    run_pipeline, store_uri,
)

STEP_METRICS = ("ut_acc", "zs_acc", "a_acc", "bwt",
                "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
# At the top of the run's artifacts (where MLflow's compare view looks), named as the local files.
REPORT_ARTIFACTS = {
    "continual_metrics.csv", "accuracy_matrix.csv", "continual_summary.json",
    "accuracy_matrix.png", "metric_curves.png", "pretraining_metrics.json",
}
RUN_NAME = f"vr_lwf alpha=1 seed=0 on {BENCHMARK}"


@pytest.fixture(scope="session")
def finished_run(finished):
    runs = mlflow_runs(store_uri(finished))
    assert len(runs) == 1, "one `kedro run`, one MLflow run"
    return runs[0]


@pytest.fixture
def client(finished):
    return MlflowClient(tracking_uri=store_uri(finished))


@pytest.fixture
def project(finished, tmp_path):
    return copy_project(finished, tmp_path / "project")


# --- the run of a default `kedro run` -----------------------------------------------------------

def test_one_finished_run_named_after_what_it_ran(finished, finished_run):
    assert finished_run.info.status == "FINISHED"
    assert finished_run.info.run_name == RUN_NAME
    tags = finished_run.data.tags
    assert tags["benchmark"] == BENCHMARK and tags["method"] == "vr_lwf"
    (folder,) = run_folders(finished)
    assert tags["run_key"] == folder.name
    assert tags["kedro_command"] == "kedro run --pipeline=__default__"  # set by kedro-mlflow
    assert "run_id" not in tags and tags["kedro_session_id"]  # not confused with MLflow's run ID


def test_the_experiment_opens_on_its_runs(finished):
    experiment = MlflowClient(tracking_uri=store_uri(finished)).get_experiment_by_name("clip-continual")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_run_logs_the_recipe_it_trained_with(finished_run):
    """Params: kedro-mlflow's flat node inputs, but the training settings as the resolved recipe
    (``recipe.*``, every level of the configuration applied), not the raw blocks."""
    params = finished_run.data.params
    assert params["method"] == "vr_lwf"
    assert params["seed"] == "0"
    assert params["model.architecture"] == "clip-continual-micro"
    configured = yaml.safe_load((REPO_ROOT / "conf/base/parameters_continual_learning.yml").read_text())
    assert params["recipe.alpha"] == str(configured["continual_learning"]["alpha"])
    assert float(params["recipe.training.lr"]) == pytest.approx(1e-4)
    assert params["recipe.training.parts"] == "wm"
    assert params["recipe.training.steps"] == "2"  # the test project's override (conf/local)
    assert params["recipe.method.class_distillation"] == "True"  # the method's own default
    assert params["recipe.seed"] == "0" and params["recipe.benchmark"] == BENCHMARK
    assert not any(name.startswith(("tracking.", "continual_learning.", "runtime_overrides")) for name in params)


def test_step_metrics_are_grouped_with_one_point_per_step(finished, finished_run, client):
    table = pd.read_csv(finished / "data" / "08_reporting" / "continual_metrics.csv")
    for name in STEP_METRICS:
        history = client.get_metric_history(finished_run.info.run_id, final_metric_name(name))
        assert sorted(point.step for point in history) == list(range(len(TASKS) + 1)), name
        logged = {point.step: point.value for point in history}
        for step, value in zip(table["step"], table[name]):
            if not math.isnan(value):
                assert logged[step] == pytest.approx(value), (name, step)
    pretraining = client.get_metric_history(finished_run.info.run_id, "pretraining/zs_acc")
    assert [point.step for point in pretraining] == [0]
    # Every metric sits in a group (a section of the run page): none is a bare `zs_acc`.
    assert {name.split("/")[0] for name in finished_run.data.metrics} == {
        "continual", "retrieval", "pretraining", "train", "cost"}


def test_each_number_is_logged_once(finished_run):
    """One zero-shot set, one retrieval set: ``zs_acc`` and ``retrieval/<recall>`` say it all."""
    names = set(finished_run.data.metrics)
    assert "continual/zs_acc" in names and "retrieval/i2t_r1" in names
    assert not [name for name in names if name.startswith(("continual/zs_acc/", "continual/retrieval",
                                                           "continual/i2t", "continual/t2i"))]
    # This run pretrained: it paid for pretraining, logged as a cost, not as a quality metric.
    assert finished_run.data.metrics["cost/pretraining_s"] > 0
    assert not [name for name in names if "seconds" in name]


def test_bookkeeping_tags_are_hidden(finished_run):
    """MLflow's UI leaves out tags under ``mlflow.``: the heartbeat and process ids sit there."""
    tags = finished_run.data.tags
    assert {HOST_TAG, PID_TAG, HEARTBEAT_TAG} <= set(tags)
    assert all(tag.startswith("mlflow.") for tag in (HOST_TAG, PID_TAG, HEARTBEAT_TAG))
    assert not [tag for tag in tags if tag.startswith("clip_continual.")]


def test_task_costs_are_logged_per_task_and_for_the_run(finished, finished_run, client):
    from clip_continual.runtime.tracking import RUN_COSTS, TASK_COSTS
    from project_helpers import TINY_PARAMETERS

    folder = next((finished / "data" / "07_model_output" / "digits_mst").iterdir())
    summaries = [json.loads((folder / f"{task}_training.json").read_text()) for task in TASKS]
    logged = {}
    for name in TASK_COSTS:
        history = client.get_metric_history(finished_run.info.run_id, f"cost/{name}")
        assert sorted(point.step for point in history) == list(range(1, len(TASKS) + 1)), name
        logged[name] = [point.value for point in sorted(history, key=lambda point: point.step)]
        assert logged[name] == pytest.approx([summary[name] for summary in summaries]), name
    training = TINY_PARAMETERS["continual_learning"]["training"]
    (models,) = run_folders(finished)
    model = CheckpointDataset(filepath=str(models / "task_5.pt")).load().model
    assert logged["images_seen"] == [training["steps"] * training["batch_size"]] * len(TASKS)
    # vr_lwf trains the whole model: every parameter of the checkpoint
    assert set(logged["trainable_parameters"]) == set(logged["stored_parameters"]) == {
        sum(p.numel() for p in model.parameters())}
    assert min(logged["extra_storage_mib"]) > 0 and min(logged["peak_memory_mib"]) > 0  # its teacher
    assert logged["device_hours"] == pytest.approx([seconds / 3600 for seconds in logged["wall_time_s"]])
    assert set(logged["teacher_forward_passes_per_step"]) == {1.0} and set(logged["backward_passes_per_step"]) == {1.0}
    metrics = finished_run.data.metrics
    for total, name in RUN_COSTS.items():
        assert metrics[f"cost/{total}"] == pytest.approx(sum(logged[name])), total


def test_learning_accuracy_is_logged_after_each_task_and_its_mean_at_the_end(finished, finished_run, client):
    table = pd.read_csv(finished / "data" / "08_reporting" / "continual_metrics.csv")
    summary = pd.read_json(finished / "data" / "08_reporting" / "continual_summary.json", typ="series")
    history = client.get_metric_history(finished_run.info.run_id, "continual/learning_acc")
    assert sorted(point.step for point in history) == list(range(1, len(TASKS) + 1))  # none at step 0
    assert [p.value for p in sorted(history, key=lambda p: p.step)] == pytest.approx(table["learning_acc"][1:])
    seen = client.get_metric_history(finished_run.info.run_id, "continual/seen_acc")
    assert sorted(point.step for point in seen) == list(range(len(TASKS) + 1))
    (mean,) = client.get_metric_history(finished_run.info.run_id, "continual/mean_learning_acc")
    assert mean.step == len(TASKS)
    assert mean.value == pytest.approx(summary["mean_learning_acc"])
    assert mean.value == pytest.approx(table["learning_acc"][1:].mean())


def test_training_losses_go_on_across_tasks(finished_run, client):
    history = client.get_metric_history(finished_run.info.run_id, "train/loss")
    ordered = sorted(history, key=lambda point: (point.timestamp, point.step))
    steps = [point.step for point in ordered]
    # 5 tasks x 2 iterations, every iteration logged (tracking.log_every = 1).
    assert steps == list(range(1, 2 * len(TASKS) + 1))
    assert all(math.isfinite(point.value) for point in history)


def test_reports_are_top_level_run_artifacts(finished, finished_run, client, tmp_path):
    run_id = finished_run.info.run_id
    names = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert names == REPORT_ARTIFACTS
    assert finished_run.info.artifact_uri.startswith((finished / "mlartifacts").as_uri())
    reporting = finished / "data" / "08_reporting"
    for name in REPORT_ARTIFACTS:  # the very files of data/08_reporting
        local = Path(client.download_artifacts(run_id, name, str(tmp_path)))
        assert local.read_bytes() == (reporting / name).read_bytes(), name


def test_mlflow_tracking_uri_overrides_the_project_store(finished, tmp_path, monkeypatch):
    project = copy_project(finished, tmp_path / "project", own_store=False)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    report = project / "data" / "08_reporting" / "continual_metrics.csv"
    report.unlink()
    run_pipeline(project, ["evaluation"])
    assert report.is_file()
    (run,) = mlflow_runs(elsewhere)
    assert run.info.run_name == "evaluation seed=0"  # no training: named after its pipelines
    assert mlflow_runs(store_uri(project)) == []


# --- runs that track nothing, or fail -----------------------------------------------------------

def test_tracking_disabled_creates_no_run(project):
    report = project / "data" / "08_reporting" / "continual_metrics.csv"
    report.unlink()
    run_pipeline(project, ["evaluation"], params={"tracking": {"enabled": False}})
    assert report.is_file()
    assert mlflow_runs(store_uri(project)) == []


def test_a_failing_run_is_marked_failed(project):
    (project / "data" / "03_primary" / "digits_test.npz").write_bytes(b"not an npz archive")  # fails at load
    with pytest.raises(Exception, match="digits_test"):
        run_pipeline(project, [BENCHMARK])
    (run,) = mlflow_runs(store_uri(project))
    assert run.info.status == "FAILED"
    assert run.info.run_name == RUN_NAME


# --- comparing methods ------------------------------------------------------------------------

def test_compare_tables_the_latest_run_of_each_method(compared):
    reporting = compared.path / "data" / "08_reporting"
    table = pd.read_csv(reporting / "method_comparison.csv")
    # ft has no distillation weight; every other method is labelled with its alpha.
    assert table["method"].tolist() == ["ft", "vr_lwf (alpha=1.0)"]
    assert {"ut_acc", "zs_acc", "a_acc", "bwt", "mean_learning_acc", "ut_acc_std"} <= set(table.columns)
    assert table["seeds"].tolist() == [1, 1] and table["zs_acc_std"].isna().all()  # one seed each
    assert (reporting / "method_comparison.png").read_bytes().startswith(b"\x89PNG")
    # Beside the accuracies, what each method cost: ft keeps nothing beside its model, vr_lwf a teacher.
    assert set(COST_COLUMNS) <= set(table.columns)
    costs = table.set_index("method")
    assert costs.loc["ft", "extra_storage_mib"] == 0 < costs.loc["vr_lwf (alpha=1.0)", "extra_storage_mib"]
    assert (costs.loc["ft", "teacher_forward_passes_per_step"], costs.loc["vr_lwf (alpha=1.0)",
            "teacher_forward_passes_per_step"]) == (0, 1)
    assert (costs["images_seen"] > 0).all() and (costs["device_hours"] > 0).all()
    assert (reporting / "method_comparison_costs.png").read_bytes().startswith(b"\x89PNG")
    # Both runs went to the project's default store, where compare (started in a subfolder)
    # found them; compare itself opened no run.
    runs = mlflow_runs(store_uri(compared.path))
    assert len(runs) == compared.runs_before_compare == 2
    assert {run.info.run_name for run in runs} == {f"ft seed=0 on {BENCHMARK}", RUN_NAME}
    ft_run = next(run for run in runs if run.data.tags["method"] == "ft")
    # ft has no distillation weight: "none", not a number MLflow's compare plot would draw at 1.01.
    assert ft_run.data.params["recipe.alpha"] == "none"
    assert all(run.info.status == "FINISHED" for run in runs)
    assert (compared.path / DEFAULT_STORE_FILE).is_file()
    assert not (compared.path / "notebooks" / DEFAULT_STORE_FILE).exists()


def test_compare_without_runs_says_what_to_run(project):
    with pytest.raises(NoRunsToCompare, match="kedro run"):
        run_pipeline(project, ["compare"])
    assert mlflow_runs(store_uri(project)) == []


# --- units ------------------------------------------------------------------------------------

def test_metric_history_groups_every_finite_number_at_its_step():
    values = {"step": 3, "ut_acc": 0.5, "learning_acc": 1, "bwt": float("nan"), "task": "task_3",
              "flag": True, "acc_row": [0.1]}
    assert metric_history(values, "continual", 3) == {
        "continual/ut_acc": {"value": 0.5, "step": 3}, "continual/learning_acc": {"value": 1.0, "step": 3},
    }


def test_step_metric_names_keep_one_name_per_number():
    one = {"zs_acc": 0.2, "zs_acc/shapes": 0.2, "i2t_r1": 0.4, "retrieval/coco/i2t_r1": 0.4,
           "retrieval/flickr/i2t_r1": 0.3, "ut_acc": 0.5}
    assert step_metric_names(one) == {"zs_acc": "continual/zs_acc", "i2t_r1": "retrieval/i2t_r1",
                                      "retrieval/flickr/i2t_r1": "retrieval/flickr/i2t_r1",
                                      "ut_acc": "continual/ut_acc"}
    several = {"zs_acc": 0.3, "zs_acc/a": 0.2, "zs_acc/b": 0.4}
    assert set(step_metric_names(several).values()) == {"continual/zs_acc", "continual/zs_acc/a",
                                                         "continual/zs_acc/b"}
    assert final_metric_name("t2i_r5") == "retrieval/t2i_r5" and final_metric_name("bwt") == "continual/bwt"


def test_runs_tagged_before_the_tags_were_hidden_are_still_read():
    assert identity_tag({"clip_continual.pid": "12"}, PID_TAG) == "12"
    assert identity_tag({PID_TAG: "13", "clip_continual.pid": "12"}, PID_TAG) == "13"


def test_pretraining_seconds_are_a_cost_of_the_run_that_pretrained_only():
    from clip_continual.pipelines.pretraining.nodes import pretraining_metrics_for_mlflow

    logged = pretraining_metrics_for_mlflow({"zs_acc": 0.5, "train_seconds": 12.0})
    assert logged == {"pretraining/zs_acc": {"value": 0.5, "step": 0},
                      "cost/pretraining_s": {"value": 12.0, "step": 0}}


def test_parameters_to_log_leave_out_tracking_and_the_raw_continual_blocks():
    """The continual_learning blocks are logged resolved, as the recipe (``recipe.*``)."""
    inputs = {"params:continual_learning": {"alpha": 1.0}, "params:mtil_order1.continual_learning": {"alpha": 2},
              "params:tracking": {"log_every": 1}, "params:runtime_overrides": {}, "params:method": "ft",
              "params:mtil_order1.model": {"architecture": "ViT-B-16"}, "model": object()}
    assert set(parameters_to_log(inputs)) == {"params:method", "params:mtil_order1.model", "model"}
    assert "params:continual_learning" in inputs  # the node's own inputs untouched


def test_tracking_uri_prefers_config_then_environment_then_project(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking_uri("http://server:5000", tmp_path) == "http://server:5000"
    assert tracking_uri(None, tmp_path) == "sqlite:///from-env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(None, tmp_path) == f"sqlite:///{(tmp_path / DEFAULT_STORE_FILE).resolve()}"
    assert tracking_uri("", tmp_path) == f"sqlite:///{(tmp_path / DEFAULT_STORE_FILE).resolve()}"


def test_artifacts_of_a_sqlite_store_go_beside_it(tmp_path):
    assert default_artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("http://server:5000") is None


def test_log_metrics_without_an_active_run_is_a_no_op():
    import mlflow

    assert mlflow.active_run() is None
    log_metrics({"ut_acc": 0.5}, step=1)  # no error, nothing to log to
    with BatchedMetrics() as batch:
        batch.log({"train/loss": 0.5}, step=1)
    assert batch.pending == []


def test_batched_metrics_write_every_point_in_batches_and_on_error():
    import mlflow

    with mlflow.start_run() as run:  # in the test's own store (conftest)
        with BatchedMetrics(flush_every_s=3600) as batch:
            for step in range(1200):  # more than one log_batch call holds
                batch.log({"train/loss": 1.0 / (step + 1), "train/nan": math.nan}, step=step)
            assert len(batch.pending) == 200  # 1000 went in one batch; the rest waits
        with pytest.raises(RuntimeError), BatchedMetrics(flush_every_s=3600) as failing:
            failing.log({"train/ce": 2.0}, step=7)
            raise RuntimeError("the task failed")
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(point.step for point in history) == list(range(1200))
    assert [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, "train/ce")] == [(7, 2.0)]
    assert client.get_metric_history(run.info.run_id, "train/nan") == []


BASE_PARAMS = {
    "method": "vr_lwf",
    "seed": 0,
    "continual_learning": {"alpha": None, "training": {"lr": 1e-4, "progress": True, "device": "auto",
                                                         "log_every": 10}},
    "evaluation": {"batch_size": 256, "device": "auto"},
    "tracking": {"enabled": True, "log_every": 1},
}


def _with(**changes):
    import copy

    params = copy.deepcopy(BASE_PARAMS)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = params
        for key in parents:
            target = target[key]
        target[leaf] = value
    return params


def test_run_key_names_the_method_and_hashes_the_science():
    key = compute_run_key(BASE_PARAMS)
    assert key.startswith("vr_lwf-") and len(key) == len("vr_lwf-") + 10
    assert compute_run_key(_with()) == key
    for changed in (_with(method="ft"), _with(continual_learning__alpha=1.0),
                    _with(continual_learning__training__lr=1e-5), _with(seed=1)):
        assert compute_run_key(changed) != key
    assert compute_run_key(_with(method="ft")).startswith("ft-")


def test_run_key_ignores_how_a_run_is_shown_or_tracked():
    key = compute_run_key(BASE_PARAMS)
    for same in (_with(continual_learning__training__progress=False),
                 _with(continual_learning__training__device="cpu"),
                 _with(continual_learning__training__log_every=1),
                 _with(evaluation__device="cuda"),
                 _with(tracking__enabled=False), _with(tracking__log_every=5)):
        assert compute_run_key(same) == key


def test_alpha_is_dropped_for_methods_without_one():
    from clip_continual.runtime.recipe import resolve_task

    block = {"alpha": 1.0, "training": {"steps": 1}}

    def config(method):
        return resolve_task(method, block, "continual_learning", "task_1", seed=0, seed_source="seed",
                            default_teacher="previous").training_config()

    assert config("ft").alpha is None
    assert config("vr_lwf").alpha == 1.0
