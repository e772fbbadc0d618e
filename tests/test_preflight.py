"""Checks before the first node that are not about one setting: the tracking store's lock, a
writable artifact store, disk space for what the run writes, and every missing input in one
message. Fast: tiny files in tmp_path, no Kedro run, no network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from clip_continual.runtime import store_lock


@pytest.fixture
def no_locks_held():
    yield
    store_lock.release_all()


def _hold_lock_in_another_process(lock):
    """A process that holds the lock as a run would: its pid and command in the file."""
    script = textwrap.dedent(f"""
        import fcntl, os, sys, time
        handle = open({str(lock)!r}, "a+")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.seek(0); handle.truncate()
        handle.write(f"{{os.getpid()}}\\nkedro run --pipelines mtil_order1\\n2026-01-01 10:00:00\\n"); handle.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_the_same_store_fails_at_once_naming_the_other(tmp_path, no_locks_held):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lock = store_lock.lock_path(uri)
    assert lock == tmp_path / "mlflow.db.lock"
    holder = _hold_lock_in_another_process(lock)
    try:
        with pytest.raises(store_lock.StoreLockedError) as error:
            store_lock.acquire(uri)
        message = str(error.value)
        assert f"PID {holder.pid}" in message and "kedro run --pipelines mtil_order1" in message
        assert "MLFLOW_TRACKING_URI" in message and "tracking.enabled=false" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, its name still in the file): its lock is taken over.
    assert store_lock.acquire(uri, command="kedro run") == lock
    assert lock.read_text().splitlines()[:2] == [str(os.getpid()), "kedro run"]
    assert store_lock.acquire(uri) == lock  # this process again: no-op
    store_lock.release_all()
    assert lock.read_text() == ""


def test_only_a_local_sqlite_store_is_locked():
    assert store_lock.lock_path("http://127.0.0.1:5000") is None
    assert store_lock.lock_path("mlruns") is None


def test_an_unwritable_artifact_store_is_found_before_the_run(tmp_path):
    from clip_continual.runtime.tracking import TrackingStoreError, check_artifact_location, default_artifact_location

    (tmp_path / "mlartifacts").write_text("a file where the artifacts' folder belongs")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingStoreError, match=r"artifacts cannot be written to '.*mlartifacts'"):
        check_artifact_location(default_artifact_location(uri))
    (tmp_path / "mlartifacts").unlink()
    check_artifact_location(default_artifact_location(uri))  # a folder that can be made is fine


@pytest.fixture(scope="module")
def defaults():
    import warnings

    from kedro.config import OmegaConfigLoader

    from project_helpers import REPO_ROOT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base", default_run_env="base")["parameters"])


def test_an_offline_mtil_run_without_data_lists_every_missing_input_at_once(defaults, tmp_path, monkeypatch):
    import copy

    from kedro.io import DataCatalog
    from kedro.pipeline import Node, Pipeline

    from clip_continual.pipelines import hooks
    from clip_continual.runtime.preflight import PreflightError

    params = copy.deepcopy(defaults)
    params["mtil_order1"]["model"]["pretrained"] = str(tmp_path / "ViT-B-16.bin")
    params["mtil_order1"]["data"]["root"] = str(tmp_path / "no_data")
    monkeypatch.setattr(hooks, "check_parameters", lambda params, defaults: None)  # tested on its own
    hook = hooks.SettingsCheckHook()
    hook._params, hook._project_path = params, tmp_path
    pipeline = Pipeline([Node(lambda: None, inputs=None, outputs="mtil_order1.pretrained_model",
                              name="load_mtil_order1_model")])
    with pytest.raises(PreflightError) as error:
        hook.before_pipeline_run({"pipeline_names": ["mtil_order1"]}, pipeline, DataCatalog())
    message = str(error.value)
    assert "2 problems" in message and "ViT-B-16.bin' does not exist" in message
    assert "mtil_order1.model.pretrained" in message
    missing = [line for line in message.split(" | ") if ": no folder at " in line]
    assert len(missing) == 11, message


GIB = 1024 ** 3


def test_what_the_run_writes_is_summed_per_disk_in_one_message(tmp_path, monkeypatch):
    """Checkpoints, prepared data and reports on one disk add up (each fits alone); the start
    model on another disk with room is not named."""
    import shutil
    from collections import namedtuple

    from clip_continual.runtime import preflight

    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()

    def device(path):
        return next((n for n, disk in ((1, small), (2, large)) if path.absolute().is_relative_to(disk)), 0)

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(preflight, "_device", device)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1, 1, 2 * GIB if device(path) == 1 else 100 * GIB))
    size = preflight.model_bytes("clip-continual-micro")
    assert 1_000_000 < size < 50_000_000  # float32 weights of the micro CLIP
    writes = [*(preflight.Write("checkpoints", small / "06_models" / f"task_{n}.pt", GIB // 4) for n in range(4)),
              preflight.Write("prepared data", small / "04_feature", GIB),
              preflight.Write("reports", small / "08_reporting" / "metrics.csv", preflight.REPORT_BYTES),
              preflight.Write("start model", large / "model.pt", size)]
    preflight.check_disk_space(writes[1:])  # 1.75 GiB fit in 2
    with pytest.raises(OSError) as error:
        preflight.check_disk_space(writes)
    assert str(error.value).startswith(
        f"not enough disk space for the run: needs about 2.0 GiB on '{small}' (checkpoints 1.0 GiB, "
        f"prepared data 1.0 GiB, reports 1.06 MB), 2.0 GiB free. Free some space")
    assert "start model" not in str(error.value)


def test_the_disk_check_counts_prepared_data_reports_and_their_mlflow_copies(defaults, tmp_path):
    from kedro.io import DataCatalog
    from kedro.pipeline import Node, Pipeline
    from kedro_datasets.json import JSONDataset
    from kedro_mlflow.io.artifacts import MlflowArtifactDataset

    from clip_continual.io import CheckpointDataset
    from clip_continual.pipelines import hooks
    from clip_continual.runtime.preflight import REPORT_BYTES, model_bytes

    hook = hooks.SettingsCheckHook()
    hook._params, hook._project_path, hook._artifacts = defaults, tmp_path, tmp_path / "mlartifacts"
    (tmp_path / "done.pt").write_bytes(b"a finished task's checkpoint, reused on resume")
    catalog = DataCatalog({
        "digits_mst.task_1.model": CheckpointDataset(filepath=str(tmp_path / "done.pt")),
        "digits_mst.task_2.model": CheckpointDataset(filepath=str(tmp_path / "task_2.pt")),
        "digits_mst.task_2.evaluation": JSONDataset(filepath=str(tmp_path / "evaluation.json")),
        "accuracy_matrix": MlflowArtifactDataset(dataset={"type": "json.JSONDataset",
                                                          "filepath": str(tmp_path / "matrix.json")}),
    })
    pipeline = Pipeline([Node(lambda: (1, 2, 3, 4), inputs=None, outputs=list(catalog.keys()), name="writes")])
    writes = hook._writes(pipeline, catalog, ["mtil_order1"])
    sizes = {what: sum(w.size for w in writes if w.what == what) for what in {w.what for w in writes}}
    assert sizes.pop("prepared data") > 10 * GIB  # MTIL's eleven datasets, none prepared yet
    assert sizes == {"checkpoints": model_bytes(defaults["model"]["architecture"]), "reports": 2 * REPORT_BYTES,
                     "MLflow artifacts": REPORT_BYTES}


def test_params_that_no_node_reads_are_refused_with_the_key_to_write():
    from clip_continual.runtime.preflight import check_overrides_read

    read = ["coco_mst.continual_learning", "coco_mst.seed", "method", "tracking"]
    check_overrides_read({"method": "ft", "coco_mst": {"continual_learning": {"training": {"lr": 1e-5}}}},
                         read, "coco_mst")  # read: no complaint
    check_overrides_read({"coco_mst.continual_learning": {"alpha": 0.5}}, read, "coco_mst")  # dotted, as typed
    with pytest.raises(ValueError) as error:
        check_overrides_read({"continual_learning": {"training": {"distributed": {"backend": "torch"}}}, "seed": 3},
                             read, "coco_mst")
    message = str(error.value)
    assert ("'continual_learning.training.distributed.backend' (write "
            "coco_mst.continual_learning.training.distributed.backend=...)") in message
    assert "'seed' (write coco_mst.seed=...)" in message and "no node of coco_mst reads them" in message


def test_the_parameters_a_pipeline_reads_are_its_nodes_inputs():
    from kedro.framework.startup import bootstrap_project

    from clip_continual.pipeline_registry import parameters_read
    from project_helpers import REPO_ROOT

    bootstrap_project(REPO_ROOT)
    coco, embedded = set(parameters_read(["coco_mst"])), set(parameters_read(["__default__"]))
    assert {"coco_mst.continual_learning", "coco_mst.seed", "method"} <= coco
    assert not {"continual_learning", "seed", "runtime_overrides"} & coco
    assert {"continual_learning", "pretraining", "seed", "data_preparation"} <= embedded
    # digits_mst pretrains nothing but loads the start model its settings name (${source_key:})
    assert {"pretraining", "model", "data_preparation"} <= set(parameters_read(["digits_mst"]))


def _readme_runs() -> list[tuple[list[str], str | None]]:
    """(pipelines, --params text or None) of every `kedro run` the README shows."""
    import re
    import shlex

    from project_helpers import REPO_ROOT

    runs = []
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        for command in re.findall(r"kedro run(?: [^`#&]*)?", line):
            words = shlex.split(command)
            if words[-1].startswith("--"):
                continue  # an option named in prose ("the syntax of `kedro run --params`")
            names = words[words.index("--pipelines") + 1].split(",") if "--pipelines" in words else ["__default__"]
            runs.append((names, words[words.index("--params") + 1] if "--params" in words else None))
    return runs


def test_every_readme_run_names_real_pipelines_and_sets_only_what_they_read():
    """A README command whose --params no node reads would run with the settings it claims to change."""
    from kedro.framework.cli.utils import _split_params
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    from clip_continual.pipeline_registry import parameters_read
    from clip_continual.runtime.preflight import check_overrides_read
    from project_helpers import REPO_ROOT

    bootstrap_project(REPO_ROOT)
    runs = _readme_runs()
    assert sum(params is not None for _, params in runs) >= 20
    assert any("coco_mst.continual_learning.training.distributed" in (params or "") for _, params in runs)
    for names, params in runs:
        assert set(names) <= set(pipelines), names
        if params is not None:
            check_overrides_read(_split_params(None, None, params), parameters_read(names), ",".join(names))
