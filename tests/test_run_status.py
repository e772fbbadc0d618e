"""A run's MLflow record tells the truth: the store is probed first, an interrupted or killed run
is never FINISHED, and compare takes only complete sequences."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from clip_continual.runtime import tracking
from clip_continual.runtime.results import NoRunsToCompare, latest_finished_runs
from clip_continual.runtime.tracking import TrackingStoreError, probe_store
from project_helpers import BENCHMARK, EXPERIMENT, copy_project, mlflow_runs, store_uri

DEAD_PID = str(2**22 + 11)  # above Linux's largest process id: never running


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_fails_within_seconds_saying_how_to_turn_tracking_off():
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingStoreError) as error:
        probe_store(uri)
    assert time.perf_counter() - started < 10
    assert uri in str(error.value) and "tracking.enabled=false" in str(error.value)


def test_an_unwritable_sqlite_store_is_named(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder belongs")
    uri = f"sqlite:///{tmp_path}/blocker/mlflow.db"
    with pytest.raises(TrackingStoreError, match="cannot be written: .*blocker' is a file"):
        probe_store(uri)
    probe_store(f"sqlite:///{tmp_path}/fresh/mlflow.db")  # a folder that can be made is fine


def test_how_a_run_ended_gives_its_status():
    assert tracking.status_for(None) == "FINISHED"
    assert tracking.status_for(ValueError("bad")) == "FAILED"
    assert tracking.status_for(KeyboardInterrupt()) == "KILLED"
    assert tracking.status_for(tracking.Terminated()) == "KILLED"


def _run(client, experiment_id, status, steps, **tags):
    run = client.create_run(experiment_id, tags={"benchmark": BENCHMARK, "method": "ft", **tags})
    client.log_param(run.info.run_id, "recipe.seed", "0")  # the seed it trained with, as every run logs
    for step in steps:
        client.log_metric(run.info.run_id, tracking.metric_name("zs_acc"), 0.5 + step / 100, step=step)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    time.sleep(0.01)  # distinct start times: newest first
    return run.info.run_id


def test_compare_takes_the_newest_complete_run_and_says_what_it_skipped(tmp_path, caplog):
    from project_helpers import _install_empty_store

    _install_empty_store(tmp_path)  # a copy of an initialised store: seconds faster than a new one
    uri = store_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(EXPERIMENT)
    complete = _run(client, experiment, "FINISHED", range(6))
    killed = _run(client, experiment, "KILLED", range(3))
    incomplete = _run(client, experiment, "FINISHED", range(3))
    abandoned = _run(client, experiment, "RUNNING", range(2),
                     **{tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: DEAD_PID})
    with caplog.at_level(logging.WARNING, logger="clip_continual.runtime.results"):
        (row,) = latest_finished_runs(uri, EXPERIMENT, BENCHMARK)
    assert row["run_id"] == complete and row["zs_acc"] == pytest.approx(0.55)
    skipped = caplog.text
    assert f"left out run {killed}" in skipped and "KILLED" in skipped
    assert f"left out run {incomplete}" in skipped and "no metrics for step(s) [3, 4, 5]" in skipped
    assert f"left out run {abandoned}" in skipped and "left RUNNING by a process that was killed" in skipped

    # The next run recognises the abandoned run and closes it; a live one is left alone.
    live = _run(client, experiment, "RUNNING", [],
                **{tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: str(os.getpid())})
    assert tracking.close_abandoned_runs(uri, EXPERIMENT) == [abandoned]
    assert client.get_run(abandoned).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"


def test_ctrl_c_inside_a_node_marks_the_run_killed_and_compare_skips_it(finished, tmp_path, monkeypatch, caplog):
    from click.testing import CliRunner
    from kedro.framework.startup import bootstrap_project

    from clip_continual.cli import cli
    from clip_continual.pipelines.continual_learning import nodes

    project = copy_project(finished, tmp_path / "project")
    real_train_on = nodes.train_on

    def interrupted_at_task_3(settings, task, *args, **kwargs):
        if task.task_index == 3:
            raise KeyboardInterrupt
        return real_train_on(settings, task, *args, **kwargs)

    monkeypatch.setattr(nodes, "train_on", interrupted_at_task_3)
    monkeypatch.chdir(project)
    bootstrap_project(project)
    result = CliRunner().invoke(cli, ["run", "--pipelines", BENCHMARK])
    assert result.exit_code == 130
    assert "interrupted; the MLflow run (if any) is marked KILLED" in result.output.splitlines()[-1]

    (run,) = mlflow_runs(store_uri(project))
    assert run.info.status == "KILLED"
    with caplog.at_level(logging.WARNING, logger="clip_continual.runtime.results"), pytest.raises(NoRunsToCompare):
        latest_finished_runs(store_uri(project), EXPERIMENT, BENCHMARK)
    assert f"left out run {run.info.run_id}" in caplog.text


def test_a_failure_ends_with_a_one_line_summary(finished, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from kedro.framework.startup import bootstrap_project

    from clip_continual.cli import cli

    project = copy_project(finished, tmp_path / "project")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    result = CliRunner().invoke(cli, ["run", "--params", "metod=ft"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: invalid parameters: unknown parameter 'metod' (did you mean 'method'?)")
    assert "Traceback" not in result.output and "--traceback" in result.output
    verbose = CliRunner().invoke(cli, ["run", "--traceback", "--params", "metod=ft"])
    assert "Traceback (most recent call last)" in verbose.output


def test_sigterm_unwinds_like_ctrl_c():
    import signal

    previous = tracking.guard_interruptions()
    try:
        with pytest.raises(tracking.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    finally:
        tracking.restore_signals(previous)
    assert signal.getsignal(signal.SIGTERM) is previous
