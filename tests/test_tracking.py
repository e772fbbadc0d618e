"""MLflow tracking: one run per `kedro run`, against temporary SQLite stores only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml
import pytest
from mlflow.tracking import MlflowClient

from clip_continual.run_key import compute_run_key
from clip_continual.tracking import (
    DEFAULT_STORE_FILE, NoRunsToCompare, default_artifact_location, flatten_params, log_metrics,
    tracking_uri,
)
from project_helpers import (
    BENCHMARK, REPO_ROOT, TASKS, copy_project, mlflow_runs, run_folders,
    run_pipeline, store_uri,
)

STEP_METRICS = ("ut_acc", "zs_acc", "a_acc", "bwt",
                "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
REPORT_ARTIFACTS = {
    "reports/continual_metrics.csv", "reports/accuracy_matrix.csv", "reports/continual_summary.json",
    "reports/accuracy_matrix_plot.png", "reports/metric_curves_plot.png",
}


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

def test_one_finished_run_named_after_benchmark_and_method(finished, finished_run):
    assert finished_run.info.status == "FINISHED"
    assert finished_run.info.run_name == f"{BENCHMARK}-vr_lwf"
    tags = finished_run.data.tags
    assert tags["benchmark"] == BENCHMARK and tags["method"] == "vr_lwf"
    (folder,) = run_folders(finished)
    assert tags["run_key"] == folder.name


def test_parameters_are_logged_flat(finished_run):
    params = finished_run.data.params
    assert params["method"] == "vr_lwf"
    assert params["benchmark"] == BENCHMARK
    assert params["seed"] == "0"
    assert params["model.architecture"] == "clip-continual-micro"
    configured = yaml.safe_load((REPO_ROOT / "conf/base/parameters_continual_learning.yml").read_text())
    assert params["continual_learning.alpha"] == str(configured["continual_learning"]["alpha"])
    assert float(params["continual_learning.training.lr"]) == pytest.approx(1e-4)
    assert params["continual_learning.training.parts"] == "wm"
    assert params["continual_learning.training.steps"] == "2"
    assert not any(name.startswith("tracking.") for name in params)


def test_step_metrics_have_one_point_per_step(finished, finished_run, client):
    table = pd.read_csv(finished / "data" / "08_reporting" / "continual_metrics.csv")
    for name in STEP_METRICS:
        history = client.get_metric_history(finished_run.info.run_id, name)
        assert sorted(point.step for point in history) == list(range(len(TASKS) + 1)), name
        logged = {point.step: point.value for point in history}
        for step, value in zip(table["step"], table[name]):
            if not math.isnan(value):
                assert logged[step] == pytest.approx(value), (name, step)
    pretraining = client.get_metric_history(finished_run.info.run_id, "pretraining/zs_acc")
    assert [point.step for point in pretraining] == [0]


def test_task_costs_are_logged_per_task(finished, finished_run, client):
    folder = next((finished / "data" / "07_model_output" / "digits_mst").iterdir())
    for name in ("trainable_parameters", "wall_time_s", "median_step_time_s"):
        history = client.get_metric_history(finished_run.info.run_id, f"task/{name}")
        assert sorted(point.step for point in history) == list(range(1, len(TASKS) + 1)), name
        summary = json.loads((folder / "task_3_training.json").read_text())
        assert {p.step: p.value for p in history}[3] == pytest.approx(summary[name])


def test_training_losses_go_on_across_tasks(finished_run, client):
    history = client.get_metric_history(finished_run.info.run_id, "train/loss")
    ordered = sorted(history, key=lambda point: (point.timestamp, point.step))
    steps = [point.step for point in ordered]
    # 5 tasks x 2 iterations, every iteration logged (tracking.log_every = 1).
    assert steps == list(range(1, 2 * len(TASKS) + 1))
    assert all(math.isfinite(point.value) for point in history)


def test_reports_are_run_artifacts(finished, finished_run, client, tmp_path):
    run_id = finished_run.info.run_id
    names = {artifact.path for artifact in client.list_artifacts(run_id, "reports")}
    assert names == REPORT_ARTIFACTS
    assert finished_run.info.artifact_uri.startswith((finished / "mlartifacts").as_uri())
    local = Path(client.download_artifacts(run_id, "reports/continual_metrics.csv", str(tmp_path)))
    pd.testing.assert_frame_equal(
        pd.read_csv(local), pd.read_csv(finished / "data" / "08_reporting" / "continual_metrics.csv")
    )
    for plot in ("accuracy_matrix_plot.png", "metric_curves_plot.png"):
        png = Path(client.download_artifacts(run_id, f"reports/{plot}", str(tmp_path)))
        assert png.read_bytes().startswith(b"\x89PNG")


# --- runs that track nothing, or fail -----------------------------------------------------------

def test_tracking_disabled_creates_no_run(project):
    report = project / "data" / "08_reporting" / "continual_metrics.csv"
    report.unlink()
    run_pipeline(project, ["evaluation"], params={"tracking": {"enabled": False}})
    assert report.is_file()
    assert mlflow_runs(store_uri(project)) == []


def test_a_failing_run_is_marked_failed(project):
    (project / "data" / "03_primary" / "digits_test.npz").unlink()
    with pytest.raises(Exception, match="digits_test"):
        run_pipeline(project, [BENCHMARK])
    (run,) = mlflow_runs(store_uri(project))
    assert run.info.status == "FAILED"
    assert run.info.run_name == f"{BENCHMARK}-vr_lwf"


# --- comparing methods ------------------------------------------------------------------------

def test_compare_tables_the_latest_run_of_each_method(compared):
    reporting = compared.path / "data" / "08_reporting"
    table = pd.read_csv(reporting / "method_comparison.csv")
    # ft has no distillation weight; every other method is labelled with its alpha.
    assert table["method"].tolist() == ["ft", "vr_lwf (alpha=1.0)"]
    assert {"ut_acc", "zs_acc", "a_acc", "bwt"} <= set(table.columns)
    assert (reporting / "method_comparison.png").read_bytes().startswith(b"\x89PNG")
    # Both runs went to the project's default store, where compare (started in a subfolder)
    # found them; compare itself opened no run.
    runs = mlflow_runs(store_uri(compared.path))
    assert len(runs) == compared.runs_before_compare == 2
    assert {run.info.run_name for run in runs} == {f"{BENCHMARK}-ft", f"{BENCHMARK}-vr_lwf"}
    assert all(run.info.status == "FINISHED" for run in runs)
    assert (compared.path / DEFAULT_STORE_FILE).is_file()
    assert not (compared.path / "notebooks" / DEFAULT_STORE_FILE).exists()


def test_compare_without_runs_says_what_to_run(project):
    with pytest.raises(NoRunsToCompare, match="kedro run"):
        run_pipeline(project, ["compare"])
    assert mlflow_runs(store_uri(project)) == []


# --- units ------------------------------------------------------------------------------------

def test_flatten_params_joins_nested_keys_with_dots():
    flat = flatten_params({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": "x" * 7000})
    assert flat == {"a.b.c": "1", "a.d": "[1, 2]", "e": "None", "f": "x" * 6000}
    assert flatten_params({}) == {}


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


BASE_PARAMS = {
    "method": "vr_lwf",
    "seed": 0,
    "continual_learning": {"alpha": None, "training": {"lr": 1e-4, "progress": True, "device": "auto",
                                                         "log_every": 10}},
    "evaluation": {"batch_size": 256, "device": "auto"},
    "tracking": {"enabled": True, "uri": None},
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
                 _with(tracking__enabled=False), _with(tracking__uri="http://server:5000")):
        assert compute_run_key(same) == key


def test_alpha_is_dropped_for_methods_without_one():
    from clip_continual.pipelines.continual_learning.nodes import training_config

    params = {"alpha": 1.0, "training": {"steps": 1}}
    assert training_config("ft", params, seed=0, default_teacher="previous").alpha is None
    assert training_config("vr_lwf", params, seed=0, default_teacher="previous").alpha == 1.0
