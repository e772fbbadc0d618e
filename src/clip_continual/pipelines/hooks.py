"""Project hooks: the keys of a run's artifacts, the checks before a run, and MLflow tracking
(one run per `kedro run`, through kedro-mlflow). The tracking logic itself lives in plain
functions of ``clip_continual.runtime.tracking``; the hooks only call them."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io import MemoryDataset
from kedro_mlflow.framework.hooks import MlflowHook
from kedro_mlflow.io.catalog.switch_catalog_logging import switch_catalog_logging
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset

from clip_continual.files import check_writable
from clip_continual.io import CheckpointDataset
from clip_continual.model.clip import ModelSpec
from clip_continual.model.sources import check_model_source
from clip_continual.runtime import preflight, store_lock, tracking
from clip_continual.runtime.benchmarks import BENCHMARKS, benchmark_in_force
from clip_continual.runtime.checkpoint_sequence import SETTINGS as CHECKPOINTS_SETTINGS, CheckpointSequence
from clip_continual.runtime.data_commands import PREPARED, check_before_run, preparation_size
from clip_continual.runtime.recipe import RUNTIME_OVERRIDES, resolve_recipe
from clip_continual.runtime.run_key import (
    compute_run_key, compute_source_key, current_run_key, run_name_of, set_current_run_key,
    set_current_source_key,
)
from clip_continual.runtime.schema import check_parameters

logger = logging.getLogger(__name__)


class RunKeyHook:
    """Computes the run key and the start model's source key from the run's parameters before
    the catalog is built."""

    @hook_impl
    def after_context_created(self, context) -> None:
        set_current_run_key(compute_run_key(context.params))
        set_current_source_key(compute_source_key(context.params))


def _local_path(dataset, project_path: Path) -> Path | None:
    """The local file a dataset writes, or None (memory datasets, remote stores)."""
    try:
        described = dataset._describe()
    except Exception:  # memory datasets and the like: nothing on disk
        return None
    filepath, protocol = described.get("filepath"), described.get("protocol", "file")
    if not filepath or protocol not in (None, "file"):
        return None
    path = Path(str(filepath))
    return path if path.is_absolute() else project_path / path


def _output_files(pipeline, catalog, project_path: Path) -> list[Path]:
    """The local files the pipeline's nodes will write."""
    paths = []
    for name in sorted(pipeline.all_outputs()):
        try:
            dataset = catalog.get(name)
        except Exception:
            continue
        path = _local_path(dataset, project_path)
        if path is not None:
            paths.append(path)
    return paths


class SettingsCheckHook:
    """Checks everything a run can know is wrong before any node runs, so that it fails at once
    (not after data preparation and pretraining), opens no MLflow run and writes nothing: every
    parameter against conf/base (see ``clip_continual.runtime.schema``), the start model's source when
    the pipeline builds it, that the files it reads but does not make are there, that the
    pipeline's outputs can be written, and that a benchmark's dataset folders are there with room
    on disk to prepare them."""

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}
        self._defaults: dict[str, Any] = {}
        self._project_path = Path.cwd()
        self._artifacts: Path | None = None  # the local folder of MLflow's artifacts, if any

    @hook_impl
    def after_context_created(self, context) -> None:
        self._params = dict(context.params)
        self._defaults = context.config_loader.base_parameters()
        self._project_path = Path(context.project_path)
        self._artifacts = _artifact_folder(context) if (self._params.get("tracking") or {}).get("enabled", True) else None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        check_parameters(self._params, self._defaults)  # alone: the other checks read the settings
        outputs = _output_files(pipeline, catalog, self._project_path)
        # Every other problem in one message: an offline run without data learns all it lacks at once.
        preflight.gather([
            *(partial(check_model_source, spec, setting) for spec, setting in self._model_sources(pipeline, catalog)),
            partial(check_writable, outputs),
            # The cheap part of `kedro data check`: missing dataset folders, room to prepare them.
            partial(check_before_run, self._params, run_params.get("pipeline_names"), self._project_path),
            lambda: preflight.check_disk_space(self._writes(pipeline, catalog, run_params.get("pipeline_names"))),
            *self._checkpoint_list(pipeline, run_params),
            *self._protocol(pipeline, run_params),
            partial(self._overrides_read, run_params.get("pipeline_names") or ["__default__"]),
            partial(self._inputs_present, pipeline, catalog, run_params.get("pipeline_names") or ["__default__"]),
        ])

    def _overrides_read(self, pipeline_names: list[str]) -> None:
        from clip_continual.pipeline_registry import parameters_read  # the registry imports every pipeline

        overrides = self._params.get(RUNTIME_OVERRIDES)
        if overrides:
            preflight.check_overrides_read(overrides, parameters_read(pipeline_names), ", ".join(pipeline_names))

    def _inputs_present(self, pipeline, catalog, pipeline_names: list[str]) -> None:
        """The run's own inputs on disk (an optional one, ``missing_ok``, aside; a file there but
        unreadable is left to its load, which says why); where they are not, the smallest
        pipeline that makes them all."""
        from kedro.framework.project import pipelines

        missing = {}
        for name in sorted(pipeline.inputs()):
            dataset = catalog.get(name) if not name.startswith("params:") and name in catalog else None
            path = _local_path(dataset, self._project_path) if dataset is not None else None
            if path is not None and not dataset._describe().get("missing_ok") and not path.exists():
                missing[name] = path
        if not missing:
            return
        makers = sorted((name for name in pipelines  # the smallest pipeline that makes them all
                         if name not in pipeline_names and set(missing) <= pipelines[name].all_outputs()),
                        key=lambda name: (len(pipelines[name].nodes), name != "__default__", name))
        made_by = None if not makers else "kedro run" if makers[0] == "__default__" else f"kedro run --pipelines {makers[0]}"
        preflight.check_inputs_present(missing, ", ".join(pipeline_names), made_by)

    def _protocol(self, pipeline, run_params: dict[str, Any]) -> list[Callable[[], Any]]:
        """The evaluation protocol against the method, where the pipeline trains one."""
        if not any("training" in node.tags for node in pipeline.nodes):
            return []
        return [partial(preflight.check_protocol, self._params, run_params.get("pipeline_names"))]

    def _checkpoint_list(self, pipeline, run_params: dict[str, Any]) -> list[Callable[[], Any]]:
        """``evaluate_checkpoints``' files (one per task of its benchmark, each there), checked
        before a benchmark's test sets are prepared."""
        if not any(CHECKPOINTS_SETTINGS in node.tags for node in pipeline.nodes):
            return []
        benchmark = benchmark_in_force(run_params.get("pipeline_names"))
        return [partial(CheckpointSequence.from_params, self._params.get(CHECKPOINTS_SETTINGS) or {}, benchmark)]

    def _model_sources(self, pipeline, catalog) -> list[tuple[ModelSpec, str]]:
        """The start models the pipeline builds: the embedded default's (unless a start model for
        this source is on disk already, reused without its weights) and each benchmark's."""
        sources = []
        names = {node.name for node in pipeline.nodes}
        if any("pretraining" in node.tags for node in pipeline.nodes) and not catalog.exists("pretrained_model_cache"):
            sources.append(("model", self._params["model"]))
        for benchmark in BENCHMARKS.values():
            if benchmark.params and f"load_{benchmark.name}_model" in names:
                sources.append((f"{benchmark.params}.model", self._params[benchmark.params]["model"]))
        return [(ModelSpec(m["architecture"], m.get("pretrained"), m.get("cache_dir")), setting)
                for setting, m in sources]

    def _writes(self, pipeline, catalog, pipeline_names: list[str] | None) -> list[preflight.Write]:
        """What the run writes, estimated: the benchmark's prepared splits not prepared yet, each
        checkpoint not on disk yet (a resumed run reuses those), and each report with its copy
        among the MLflow artifacts. Generated arrays (the embedded data, method states) are a
        few MB and not counted."""
        writes = [preflight.Write("prepared data", self._project_path / PREPARED,
                                  preparation_size(self._params, pipeline_names, self._project_path))]
        for name in sorted(pipeline.all_outputs()):
            dataset = catalog.get(name) if name in catalog else None
            path = _local_path(dataset, self._project_path) if dataset is not None else None
            if path is None:
                continue
            if isinstance(dataset, CheckpointDataset):
                if not path.exists():
                    what = "start model" if name.endswith("pretrained_model") else "checkpoints"
                    writes.append(preflight.Write(what, path, preflight.model_bytes(self._architecture(name))))
            elif path.suffix in (".json", ".csv", ".png"):
                writes.append(preflight.Write("reports", path, preflight.REPORT_BYTES))
                if hasattr(dataset, "_logging_activated") and self._artifacts is not None:  # MlflowArtifactDataset
                    writes.append(preflight.Write("MLflow artifacts", self._artifacts, preflight.REPORT_BYTES))
        return writes

    def _architecture(self, dataset_name: str) -> str:
        owner = BENCHMARKS.get(dataset_name.partition(".")[0])
        return (self._params[owner.params] if owner and owner.params else self._params)["model"]["architecture"]


def _configured_store(context) -> str:
    """The tracking URI of conf/<env>/mlflow.yml (by default `MLFLOW_TRACKING_URI`, else the
    project's SQLite file), read before kedro-mlflow first contacts the store."""
    loader = context.config_loader
    loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    try:
        server = dict(loader["mlflow"].get("server") or {})
    except MissingConfigException:
        server = {}
    return server.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"


def _artifact_folder(context) -> Path | None:
    """Where a local store keeps the runs' artifacts (``mlartifacts`` beside a SQLite file, the
    folder of a file store); None for a server's store."""
    uri = _configured_store(context)
    location = tracking.default_artifact_location(uri)
    if location:
        return Path(urlparse(location).path)
    if "://" in uri:
        return None
    return Path(uri) if Path(uri).is_absolute() else Path(context.project_path) / uri


class MlflowTrackingHook(MlflowHook):
    """kedro-mlflow's hook (conf/<env>/mlflow.yml, parameters, the MLflow datasets of the
    catalog), plus what the plugin does not do: the run's name and tags, parameters a method does
    not use left out, `--params tracking.enabled=false`, and a true record of how the run ended
    (the store probed first; FAILED on an error, KILLED on Ctrl-C or SIGTERM; a run left RUNNING
    by a killed process marked KILLED by the next run). The logic lives in ``tracking``."""

    def __init__(self) -> None:
        super().__init__()
        self._params: dict[str, Any] = {}
        self._overrides: dict[str, Any] = {}
        self._enabled = True
        self._signals: Any = None
        self._store_busy: Exception | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._params = dict(context.params)
        self._enabled = bool((self._params.get("tracking") or {}).get("enabled", True))
        if not self._enabled:
            return
        # A variant is what the command changed (--params, a sweep's variant); conf/local is
        # every run's setting.
        self._overrides = tracking.variant_overrides(getattr(context.config_loader, "runtime_params", None) or {},
                                                     context.config_loader.base_parameters(), self._params.get("method"))
        store = _configured_store(context)
        tracking.probe_store(store)
        self._store_busy = None
        try:  # before kedro-mlflow first opens the store (and creates its tables)
            store_lock.acquire(store)
        except store_lock.StoreLockedError as error:
            if not store_lock.store_exists(store):
                raise  # two first runs: the other one is creating MLflow's tables
            self._store_busy = error  # refused in before_pipeline_run unless it only reads (compare)
        tracking.end_run_left_open("KILLED")  # one this process left open (interrupted in-process)
        super().after_context_created(context)
        uri, experiment = self.mlflow_config.server.mlflow_tracking_uri, self.mlflow_config.tracking.experiment.name
        tracking.mark_experiment_kind(uri, experiment)
        tracking.probe_artifact_store(uri, experiment)
        tracking.close_abandoned_runs(uri, experiment)

    def _opens_run(self, run_params: dict[str, Any]) -> bool:
        """As kedro-mlflow decides: not when every pipeline run is in `disable_tracking`."""
        disabled = self.mlflow_config.tracking.disable_tracking.pipelines
        return not all(name in disabled for name in run_params.get("pipeline_names") or ["__default__"])

    def _recipe(self, run_params: dict[str, Any], pipeline):
        """The resolved settings of the benchmark in force (None without a continual sequence):
        the run's name, tags and params all come from them."""
        if not any("training" in node.tags for node in pipeline.nodes):
            return None
        benchmark = benchmark_in_force(run_params.get("pipeline_names"))
        return resolve_recipe(benchmark, self._params, overrides=self._params.get(RUNTIME_OVERRIDES))

    def _run_name(self, run_params: dict[str, Any], recipe) -> str:
        return run_name_of(recipe, run_params.get("pipeline_names"), self._params, self._overrides)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.run_id = None  # a hook outlives its session (notebooks, tests): never reopen an old run
        if self._enabled and not self._opens_run(run_params):
            store_lock.release_all()  # compare only reads: it neither waits for nor blocks a run
        elif self._enabled and self._store_busy is not None:
            raise self._store_busy
        recipe = self._recipe(run_params, pipeline) if self._enabled else None
        if self._enabled:
            self.mlflow_config.tracking.run.name = self._run_name(run_params, recipe)
            super().before_pipeline_run(run_params, pipeline, catalog)
        self._is_mlflow_enabled = self._enabled and self._is_mlflow_enabled
        if not self._is_mlflow_enabled:
            _untrack(pipeline, catalog)
            return
        import mlflow

        self._signals = tracking.guard_interruptions()
        tracking.rename_session_tag(self.run_id)
        method = self._params.get("method", "unknown")
        if any(CHECKPOINTS_SETTINGS in node.tags for node in pipeline.nodes):  # what was evaluated, not trained
            method = (self._params.get(CHECKPOINTS_SETTINGS) or {}).get("label") or "checkpoints"
        alpha = recipe.tasks[0].settings.get("alpha") if recipe else None
        mlflow.set_tags({
            "benchmark": benchmark_in_force(run_params.get("pipeline_names")).name,
            "method": method,
            tracking.VARIANT_TAG: tracking.variant_label(method, alpha, self._overrides),
            "run_key": current_run_key(),
            **tracking.run_identity_tags(),
        })
        if recipe is not None:
            tracking.log_recipe(recipe)

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        logged = tracking.parameters_to_log(inputs)
        super().before_node_run(node, catalog, logged, is_async)

    @hook_impl
    def after_node_run(self) -> None:
        if self._is_mlflow_enabled:
            tracking.heartbeat()

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        super().after_pipeline_run(run_params, pipeline, catalog)
        tracking.restore_signals(self._signals)
        self._signals = None
        store_lock.release_all()

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self._is_mlflow_enabled:
            super().on_pipeline_error(error, run_params, pipeline, catalog)  # ends the run FAILED
        tracking.restore_signals(self._signals)
        self._signals = None
        store_lock.release_all()


def _untrack(pipeline, catalog) -> None:
    """No MLflow run: the pipeline's MLflow artifact datasets only write their local files, and
    its metric datasets become memory datasets (they would otherwise open a run of their own)."""
    for name in pipeline.datasets():
        dataset = catalog.get(name)  # materialises dataset factories
        if isinstance(dataset, MlflowMetricsHistoryDataset):
            catalog[name] = MemoryDataset()
    switch_catalog_logging(catalog, False)
