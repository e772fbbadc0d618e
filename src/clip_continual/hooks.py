"""Project hooks: the keys of a run's artifacts, the checks before a run, and MLflow tracking
(one run per `kedro run`). The tracking logic itself lives in plain functions of
``clip_continual.tracking``; the hooks only call them."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.framework.hooks import hook_impl
from matplotlib.figure import Figure

from clip_continual import tracking
from clip_continual.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK
from clip_continual.files import check_writable
from clip_continual.models import ModelSpec, check_model_source
from clip_continual.run_key import (
    compute_run_key, compute_source_key, current_run_key, set_current_run_key, set_current_source_key,
)
from clip_continual.schema import check_parameters
from clip_continual.tracking import default_artifact_location, flatten_params, log_metrics, tracking_uri

logger = logging.getLogger(__name__)

EVALUATION_SUFFIX = ".evaluation"
TRAINING_SUMMARY_SUFFIX = ".training_summary"
TASK_COSTS = ("trainable_parameters", "wall_time_s", "median_step_time_s")


class RunKeyHook:
    """Computes the run key and the start model's source key from the run's parameters before
    the catalog is built."""

    @hook_impl
    def after_context_created(self, context) -> None:
        set_current_run_key(compute_run_key(context.params))
        set_current_source_key(compute_source_key(context.params))


def _base_parameters(context) -> dict[str, Any]:
    """The parameters of conf/base alone: every known key with its default (the schema)."""
    loader = context.config_loader
    base = loader.base_env or "base"
    with warnings.catch_warnings():  # OmegaConf's deprecation notices, already shown once
        warnings.simplefilter("ignore", UserWarning)
        return dict(type(loader)(conf_source=str(loader.conf_source), base_env=base,
                                 default_run_env=base, merge_strategy={"parameters": "soft"})["parameters"])


def _output_files(pipeline, catalog, project_path: Path) -> list[Path]:
    """The local files the pipeline's nodes will write."""
    paths = []
    for name in sorted(pipeline.all_outputs()):
        try:
            described = catalog.get(name)._describe()
        except Exception:  # memory datasets and the like: nothing on disk
            continue
        filepath, protocol = described.get("filepath"), described.get("protocol", "file")
        if filepath and protocol in (None, "file"):
            path = Path(str(filepath))
            paths.append(path if path.is_absolute() else project_path / path)
    return paths


class SettingsCheckHook:
    """Checks everything a run can know is wrong before any node runs, so that it fails at once
    (not after data preparation and pretraining), opens no MLflow run and writes nothing: every
    parameter against conf/base (see ``clip_continual.schema``), the start model's source when
    the pipeline builds it, and that the pipeline's outputs can be written."""

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}
        self._defaults: dict[str, Any] = {}
        self._project_path = Path.cwd()

    @hook_impl
    def after_context_created(self, context) -> None:
        self._params = dict(context.params)
        self._defaults = _base_parameters(context)
        self._project_path = Path(context.project_path)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        check_parameters(self._params, self._defaults)
        # A start model already on disk for this source is reused without its weights (so an
        # open_clip tag needs no network then).
        builds_start_model = any("pretraining" in node.tags for node in pipeline.nodes)
        if builds_start_model and not catalog.exists("pretrained_model_cache"):
            model = self._params["model"]
            check_model_source(ModelSpec(model["architecture"], model.get("pretrained"), model.get("cache_dir")))
        check_writable(_output_files(pipeline, catalog, self._project_path))


def _benchmark_of(pipeline_names: list[str] | None) -> str:
    for name in pipeline_names or ["__default__"]:
        if name in BENCHMARKS:
            return name
    return DEFAULT_BENCHMARK


class MlflowTrackingHook:
    """One MLflow run per `kedro run`: parameters once, each continual step's metrics with
    `step` = task index (0 = the starting model), training losses, reports as artifacts.

    The store is probed before the run; an error ends the run FAILED, Ctrl-C or SIGTERM KILLED;
    a run left RUNNING by a killed process is marked KILLED by the next run; a resumed run logs
    the stored evaluations of the tasks it skipped, so it holds the whole sequence."""

    def __init__(self) -> None:
        self._settings: dict[str, Any] = {}
        self._params: dict[str, Any] = {}
        self._project_path = Path.cwd()
        self._active = False
        self._logged: set[str] = set()
        self._signals: Any = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)
        self._params = dict(context.params)
        self._settings = dict(self._params.get("tracking") or {})

    def _wanted(self, pipeline) -> bool:
        if not self._settings.get("enabled", True):
            return False
        skipped = set(self._settings.get("skip_pipelines_tagged", ["untracked"]))
        return any(not (set(node.tags) & skipped) for node in pipeline.nodes)

    def _open_experiment(self, uri: str) -> str:
        import mlflow

        tracking.probe_store(uri)
        tracking.end_run_left_open("KILLED")  # one this process left open (interrupted in-process)
        mlflow.set_tracking_uri(uri)
        experiment_name = self._settings.get("experiment_name", "clip-continual")
        if mlflow.get_experiment_by_name(experiment_name) is None:
            mlflow.create_experiment(experiment_name, artifact_location=default_artifact_location(uri))
        mlflow.set_experiment(experiment_name)
        tracking.close_abandoned_runs(uri, experiment_name)
        return experiment_name

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not self._wanted(pipeline):
            return
        import mlflow

        uri = tracking_uri(self._settings.get("uri"), self._project_path)
        self._open_experiment(uri)
        benchmark = _benchmark_of(run_params.get("pipeline_names"))
        method = self._params.get("method", "unknown")
        run = mlflow.start_run(run_name=f"{benchmark}-{method}")
        self._active, self._logged = True, set()
        self._signals = tracking.guard_interruptions()
        mlflow.set_tags({
            "benchmark": benchmark,
            "method": method,
            "run_key": current_run_key(),
            "kedro.session_id": str(run_params.get("session_id") or run_params.get("run_id") or ""),
            "kedro.pipelines": ",".join(run_params.get("pipeline_names") or ["__default__"]),
            **tracking.run_identity_tags(),
        })
        flat = flatten_params({k: v for k, v in self._params.items() if k != "tracking"})
        flat["benchmark"] = benchmark
        items = sorted(flat.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[start:start + 100]))
        logger.info("MLflow run %s (%s) in %s", run.info.run_id, run.info.run_name, uri)

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        if not self._active:
            return
        for name, value in outputs.items():
            if name.endswith(EVALUATION_SUFFIX) and isinstance(value, dict):
                tracking.log_stored_evaluations([value])
                self._logged.add(name)
            elif name.endswith(TRAINING_SUMMARY_SUFFIX) and isinstance(value, dict):
                # What a task costs, per method: step = task index, beside its metrics.
                log_metrics({f"task/{k}": value[k] for k in TASK_COSTS if k in value},
                            step=value["task_index"])
            elif name == "pretraining_metrics" and isinstance(value, dict):
                log_metrics({f"pretraining/{k}": v for k, v in value.items()}, step=0)
        tracking.heartbeat()

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if not self._active or dataset_name not in self._settings.get("artifacts", []):
            return
        import mlflow

        if isinstance(data, Figure):
            mlflow.log_figure(data, f"reports/{dataset_name}.png")
        elif isinstance(data, pd.DataFrame):
            mlflow.log_text(data.to_csv(index=False), f"reports/{dataset_name}.csv")
        elif isinstance(data, dict):
            mlflow.log_dict(data, f"reports/{dataset_name}.json")

    def _log_skipped_evaluations(self, pipeline, catalog) -> None:
        """Evaluations the run did not compute (`--only-missing-outputs` skipped their tasks)."""
        names = sorted(n for n in pipeline.all_outputs() if n.endswith(EVALUATION_SUFFIX) and n not in self._logged)
        tracking.log_stored_evaluations(catalog.load(n) for n in names if catalog.exists(n))

    @hook_impl
    def after_pipeline_run(self, pipeline, catalog) -> None:
        if self._active:
            self._log_skipped_evaluations(pipeline, catalog)
        self._end(tracking.status_for(None))

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        self._end(tracking.status_for(error))

    def _end(self, status: str) -> None:
        if self._active:
            import mlflow

            mlflow.end_run(status=status)
            tracking.restore_signals(self._signals)
            self._active = False
