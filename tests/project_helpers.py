"""Temporary Kedro projects for the pipeline, tracking and notebook tests.

A temporary project is this repository's ``conf/`` and ``pyproject.toml`` copied into a temporary
folder, with a ``conf/local/parameters.yml`` of tiny settings and a tracking store of its own.
Catalog paths are relative and Kedro resolves them against the project path (runs also start in
the project folder, as ``kedro run`` does), so every artifact lands in the temporary project:
the repository's own ``data/`` and ``mlflow.db`` are never touched.

Two finished projects are built once per test session and shared by the test modules (read
only; a test that changes a project works on its own ``copy_project``):

- ``finished_project``: the default pipeline (``vr_lwf``), one MLflow run in its store;
- ``compared_project``: a copy that ran ``digits_mst`` with ``vr_lwf`` and then with ``ft``
  (``only_missing_outputs``), then ``compare``, with the project's default store.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from kedro.io import MemoryDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = "digits_mst"
TASKS = ("task_1", "task_2", "task_3", "task_4", "task_5")
STORE_FILE = "mlflow.db"
EXPERIMENT = "clip-continual"

# Seconds, not minutes: a micro CLIP, a small corpus, two iterations per task.
TINY_PARAMETERS: dict[str, Any] = {
    "model": {"architecture": "clip-continual-micro"},
    "data_preparation": {
        "shapes": {"corpus_size": 256, "zero_shot_per_class": 2, "retrieval_size": 24,
                   "reference_size": 32},
        "glyphs": {"count": 32},
    },
    "pretraining": {"steps": 3, "batch_size": 32, "progress": False},
    "continual_learning": {"training": {"steps": 2, "batch_size": 16, "progress": False}},
    "evaluation": {"batch_size": 64},
}


def benchmark_script(name: str) -> Any:
    """``benchmarks/<name>.py`` imported as the module ``name`` (registered in ``sys.modules``:
    dataclasses and pickling look their module up there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def store_uri(project: Path) -> str:
    return f"sqlite:///{project / STORE_FILE}"


def write_local_parameters(project: Path, own_store: bool = True) -> None:
    """The tiny settings as the project's local overrides. ``own_store``: conf/local/mlflow.yml
    names the project's SQLite file; otherwise mlflow.yml's default is left to find it (the
    project's default store)."""
    local = project / "conf" / "local"
    local.mkdir(parents=True, exist_ok=True)
    (local / "parameters.yml").write_text(yaml.safe_dump(TINY_PARAMETERS, sort_keys=False))
    mlflow_yml = local / "mlflow.yml"
    if own_store:
        mlflow_yml.write_text(yaml.safe_dump({"server": {"mlflow_tracking_uri": store_uri(project)}}))
    elif mlflow_yml.exists():
        mlflow_yml.unlink()


_STORE_TEMPLATE: list[Path] = []


def _install_empty_store(project: Path) -> None:
    """An empty, initialised tracking store: a copy of one made once (creating MLflow's tables
    takes seconds, copying the file milliseconds)."""
    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="clip-continual-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        MlflowClient(tracking_uri=store_uri(folder)).search_experiments()
        _STORE_TEMPLATE.append(folder / STORE_FILE)
    shutil.copy2(_STORE_TEMPLATE[0], project / STORE_FILE)


def make_project(project: Path) -> Path:
    """A fresh temporary project at ``project`` (no data yet)."""
    project.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "conf", project / "conf",
                    ignore=lambda folder, names: names if Path(folder).name == "local" else [])
    shutil.copy2(REPO_ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "src").mkdir(exist_ok=True)  # Kedro checks that the source folder exists
    write_local_parameters(project)
    _install_empty_store(project)
    return project


def copy_project(source: Path, target: Path, own_store: bool = True) -> Path:
    """A copy of ``source`` with all its data but a new, empty tracking store."""
    shutil.copytree(
        source, target,
        ignore=shutil.ignore_patterns(STORE_FILE, "mlartifacts", "sessions", ".ipynb_checkpoints"),
    )
    write_local_parameters(target, own_store)
    _install_empty_store(target)
    return target


@contextmanager
def _running_in(folder: Path) -> Iterator[None]:
    import torch

    previous, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(folder)
    torch.set_num_threads(1)  # a micro model is fastest on one thread, and leaves the others free
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.chdir(previous)


def run_pipeline(
    project: Path,
    pipelines: list[str] | None = None,
    params: dict[str, Any] | None = None,
    only_missing_outputs: bool = False,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """``kedro run [--pipelines ...] [--params ...] [--only-missing-outputs]``, started in
    ``cwd`` (default: the project folder)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.runner import SequentialRunner

    with _running_in(cwd or project):
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=params) as session:
            # The runner `kedro run` passes: kedro-viz records a run's node statuses only then.
            return session.run(pipeline_names=pipelines, only_missing_outputs=only_missing_outputs,
                               runner=SequentialRunner())


def run_folders(project: Path, layer: str = "06_models", benchmark: str = BENCHMARK) -> list[Path]:
    """The run-key folders of ``benchmark`` under ``data/<layer>``."""
    root = project / "data" / layer / benchmark
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def file_state(path: Path) -> tuple[int, str]:
    """What tells an untouched file: its modification time (ns) and a digest of its bytes."""
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def mlflow_runs(uri: str) -> list[Any]:
    """Every run of the project's experiment in the store at ``uri`` (newest first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


# --- the shared, finished projects ----------------------------------------------------------

def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's shared projects are built: under pytest-xdist, the folder that every
    worker's temporary folder lies in, so that one worker builds each and the others reuse it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
                build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """The project ``name`` and what its ``build`` recorded (JSON), built by the first process
    of the session that asks for it while the others wait for it."""
    from filelock import FileLock

    root = _shared_root(tmp_path_factory)
    project, record = root / name / "project", root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.exists():
            shutil.rmtree(project.parent, ignore_errors=True)  # what a failed build left
            record.write_text(json.dumps(build(project)))
    return project, json.loads(record.read_text())


def finished_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary project after one tiny default ``kedro run`` (built once per session)."""
    def build(project: Path) -> dict[str, Any]:
        run_pipeline(make_project(project))
        return {}
    return _built_once(tmp_path_factory, "finished", build)[0]


@dataclass(frozen=True)
class ComparedProject:
    path: Path
    vr_lwf_checkpoints: dict[str, tuple[int, str]]  # task -> file_state before the ft run
    vr_lwf_folder: str
    runs_before_compare: int


def compared_project(tmp_path_factory: pytest.TempPathFactory) -> ComparedProject:
    """A copy of the finished project, without a local mlflow.yml nor ``MLFLOW_TRACKING_URI`` (so
    the project's default store), that ran ``digits_mst`` with ``vr_lwf``, then with ``ft`` and
    ``only_missing_outputs``, then ``compare`` from a subfolder (built once per session)."""
    def build(project: Path) -> dict[str, Any]:
        copy_project(finished_project(tmp_path_factory), project, own_store=False)
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            run_pipeline(project, [BENCHMARK])
            (folder,) = run_folders(project)
            checkpoints = {task: list(file_state(folder / f"{task}.pt")) for task in TASKS}
            run_pipeline(project, [BENCHMARK], params={"method": "ft"}, only_missing_outputs=True)
            runs = len(mlflow_runs(store_uri(project)))
            subfolder = project / "notebooks"
            subfolder.mkdir(exist_ok=True)
            run_pipeline(project, ["compare"], cwd=subfolder)
        return {"checkpoints": checkpoints, "folder": folder.name, "runs": runs}

    project, built = _built_once(tmp_path_factory, "compared", build)
    checkpoints = {task: tuple(state) for task, state in built["checkpoints"].items()}
    return ComparedProject(project, checkpoints, built["folder"], built["runs"])


# --- a pipeline's nodes on an in-memory catalog (no session, no files, no tracking) ---------------

def base_parameters() -> dict[str, Any]:
    """conf/base's parameters, as a run without overrides reads them."""
    import warnings

    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base", default_run_env="base",
                                      merge_strategy={"parameters": "soft"})["parameters"])


class KeptDataset(MemoryDataset):
    """Kept after its last reader has run (the runner releases what no node reads again) and
    handed on as it is, never copied (the project's catalog stores models as files)."""

    def __init__(self, *data: Any) -> None:
        super().__init__(copy_mode="assign")
        if data:
            self._data = data[0]  # None too (a method without a reference set)

    def _release(self) -> None:
        pass
