"""Project hooks: the run key of a run's artifacts, and MLflow tracking (one run per `kedro run`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.framework.hooks import hook_impl
from matplotlib.figure import Figure

from clip_continual.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK
from clip_continual.run_key import compute_run_key, current_run_key, set_current_run_key
from clip_continual.tracking import default_artifact_location, flatten_params, log_metrics, tracking_uri

logger = logging.getLogger(__name__)

EVALUATION_SUFFIX = ".evaluation"
TRAINING_SUMMARY_SUFFIX = ".training_summary"
TASK_COSTS = ("trainable_parameters", "wall_time_s", "median_step_time_s")
EVALUATION_METRICS = (
    "ut_acc", "zs_acc", "a_acc", "bwt",
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
)


class RunKeyHook:
    """Computes the run key from the run's parameters before the catalog is built."""

    @hook_impl
    def after_context_created(self, context) -> None:
        set_current_run_key(compute_run_key(context.params))


class SettingsCheckHook:
    """Checks the continual-learning settings before anything runs, so that a bad
    `--params method=...` or learning rate fails at once (not after data preparation and
    pretraining) and opens no MLflow run."""

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        self._params = dict(context.params)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not any("training" in node.tags for node in pipeline.nodes):
            return
        from clip_continual.pipelines.continual_learning.nodes import training_config
        from clip_continual.training import TrainingConfigError

        try:
            training_config(self._params.get("method"), self._params.get("continual_learning") or {},
                            self._params.get("seed", 0), default_teacher="previous")
        except TrainingConfigError as error:
            raise TrainingConfigError(
                f"invalid continual-learning parameters: {error} (set them in conf/ or with --params)"
            ) from error


def _benchmark_of(pipeline_names: list[str] | None) -> str:
    for name in pipeline_names or ["__default__"]:
        if name in BENCHMARKS:
            return name
    return DEFAULT_BENCHMARK


class MlflowTrackingHook:
    """One MLflow run per `kedro run`: parameters once, each continual step's metrics with
    `step` = task index (0 = the starting model), training losses, reports as artifacts."""

    def __init__(self) -> None:
        self._settings: dict[str, Any] = {}
        self._params: dict[str, Any] = {}
        self._project_path = Path.cwd()
        self._active = False

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

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not self._wanted(pipeline):
            return
        import mlflow

        uri = tracking_uri(self._settings.get("uri"), self._project_path)
        mlflow.set_tracking_uri(uri)
        experiment_name = self._settings.get("experiment_name", "clip-continual")
        if mlflow.get_experiment_by_name(experiment_name) is None:
            mlflow.create_experiment(experiment_name, artifact_location=default_artifact_location(uri))
        mlflow.set_experiment(experiment_name)
        benchmark = _benchmark_of(run_params.get("pipeline_names"))
        method = self._params.get("method", "unknown")
        run = mlflow.start_run(run_name=f"{benchmark}-{method}")
        self._active = True
        mlflow.set_tags({
            "benchmark": benchmark,
            "method": method,
            "run_key": current_run_key(),
            "kedro.session_id": str(run_params.get("session_id") or run_params.get("run_id") or ""),
            "kedro.pipelines": ",".join(run_params.get("pipeline_names") or ["__default__"]),
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
                # Headline metrics, and each set of the suite alone (zs_acc/<set>, retrieval/<set>/...).
                log_metrics({k: v for k, v in value.items() if k in EVALUATION_METRICS or "/" in k},
                            step=value["step"])
            elif name.endswith(TRAINING_SUMMARY_SUFFIX) and isinstance(value, dict):
                # What a task costs, per method: step = task index, beside its metrics.
                log_metrics({f"task/{k}": value[k] for k in TASK_COSTS if k in value},
                            step=value["task_index"])
            elif name == "pretraining_metrics" and isinstance(value, dict):
                log_metrics({f"pretraining/{k}": v for k, v in value.items()}, step=0)

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

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._end("FINISHED")

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._end("FAILED")

    def _end(self, status: str) -> None:
        if self._active:
            import mlflow

            mlflow.end_run(status=status)
            self._active = False
