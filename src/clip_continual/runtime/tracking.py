"""MLflow tracking: where the store is, how parameters are flattened, metric logging that is a
no-op when no run is active (so the science runs the same with tracking off), and what keeps a
run's record true: the store probed before the run, an interrupted run marked KILLED (never
FINISHED), a run left RUNNING by a killed process recognised; which runs are results is
``results.py``. Plain functions, no Kedro import: any hook can call them."""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clip_continual.runtime.run_key import SPEED_SWITCHES, START_MODEL_BLOCKS

logger = logging.getLogger(__name__)

DEFAULT_STORE_FILE = "mlflow.db"


def tracking_uri(configured: str | None, project_path: Path) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else the project's SQLite file."""
    if configured:
        return configured
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return f"sqlite:///{(project_path / DEFAULT_STORE_FILE).resolve()}"


def default_artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts go in `mlartifacts/` beside the database file."""
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        return (db_path.parent / "mlartifacts").resolve().as_uri()
    return None


def _finite_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """Log finite numeric metrics to the active MLflow run, if there is one."""
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = _finite_numbers(metrics)
    if clean:
        mlflow.log_metrics(clean, step=int(step))


class BatchedMetrics:
    """Per-iteration metrics for the active MLflow run, written a batch at a time.

    One store write per step cost about 25 ms on a local SQLite store, a quarter of the
    embedded default's training step; a batch every ``flush_every_s`` seconds (and on leaving the ``with`` block,
    error or not) keeps the run's curves live and complete. A no-op without an active run."""

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, flush_every_s: float = 10.0) -> None:
        import mlflow
        from mlflow.entities import Metric

        run = mlflow.active_run()
        self.run_id = run.info.run_id if run is not None else None
        self.metric = Metric
        self.flush_every_s = flush_every_s
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        timestamp = int(time.time() * 1000)
        self.pending += [self.metric(name, value, timestamp, int(step))
                         for name, value in _finite_numbers(metrics).items()]
        if len(self.pending) >= self.MAX_BATCH or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            from mlflow.tracking import MlflowClient

            for start in range(0, len(self.pending), self.MAX_BATCH):
                MlflowClient().log_batch(self.run_id, metrics=self.pending[start:start + self.MAX_BATCH])
            self.pending = []
        self.last_flush = time.monotonic()

    def __enter__(self) -> BatchedMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()


FINAL_METRICS = ("ut_acc", "zs_acc", "a_acc", "bwt", "mean_learning_acc", "seen_acc",
                 "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")  # see final_metric_name
PROBE_TIMEOUT_S = 5.0
VARIANT_TAG = "variant"  # what compare groups seeds by: the method and the settings it changed
# Bookkeeping, not results: under ``mlflow.``, which the MLflow UI leaves out of a run's tags.
HOST_TAG, PID_TAG, HEARTBEAT_TAG = (f"mlflow.clip_continual.{name}" for name in ("host", "pid", "heartbeat"))
TRACKING_OFF_HINT = ("point MLFLOW_TRACKING_URI (or server.mlflow_tracking_uri in conf/<env>/mlflow.yml) "
                     "at a reachable store, or run without tracking: --params tracking.enabled=false")


class TrackingStoreError(RuntimeError):
    """The tracking store cannot be reached or written; the message says which and how to fix it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run unwinds, its MLflow run is marked KILLED."""


# --- the store, probed once before a run ----------------------------------------------------

def _probe_server(uri: str, timeout: float) -> None:
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        reason = f"no answer within {timeout:.0f} s" if isinstance(error, TimeoutError) else (
            (error.strerror or str(error)).lower())
        raise TrackingStoreError(
            f"the MLflow tracking store {uri} cannot be reached ({reason}); "
            f"{TRACKING_OFF_HINT}"
        ) from error


def _probe_folder(uri: str, path: Path) -> None:
    from clip_continual.files import _unwritable

    reason = _unwritable(path)
    if reason is None and path.is_file() and not os.access(path, os.R_OK):
        reason = "the file is not readable"
    if reason:
        raise TrackingStoreError(f"the MLflow tracking store {uri} cannot be written: {reason}; {TRACKING_OFF_HINT}")


def probe_store(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds, naming the URI, the cause and the fix, when the store is unusable (MLflow
    itself retries an unreachable server for minutes). Other schemes are left to MLflow."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _probe_server(uri, timeout)
    elif scheme == "sqlite" and uri.startswith("sqlite:///"):
        _probe_folder(uri, Path(uri[len("sqlite:///"):]))
    elif scheme in ("", "file"):
        _probe_folder(uri, Path(urlparse(uri).path if scheme else uri) / "meta.yaml")


def probe_artifact_store(uri: str, experiment_name: str) -> None:
    """The folder a run's artifacts go to (the experiment's, else `mlartifacts/` beside a SQLite
    store) can be written: found now, not when the run's first report is logged at its end."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment_name)
    check_artifact_location(experiment.artifact_location if experiment is not None
                            else default_artifact_location(uri))


def check_artifact_location(location: str | None) -> None:
    """Raise ``TrackingStoreError`` when a local artifact location cannot be written."""
    parsed = urlparse(location or "")
    if parsed.scheme not in ("", "file") or not location:
        return  # a server's or a cloud store: MLflow reports its own errors
    from clip_continual.files import _unwritable

    folder = Path(parsed.path if parsed.scheme else location)
    reason = _unwritable(folder / "artifacts")
    if reason:
        raise TrackingStoreError(f"the run's artifacts cannot be written to '{folder}': {reason}; "
                                 f"fix the folder's permissions, or {TRACKING_OFF_HINT}")


# --- how a run ends --------------------------------------------------------------------------

def status_for(error: BaseException | None) -> str:
    """FINISHED when the pipeline ended, KILLED for Ctrl-C / SIGTERM, FAILED for an error."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def end_run_left_open(status: str = "KILLED") -> None:
    """End the active MLflow run, if one is still open, with ``status``. Registered at exit
    before MLflow's own handler, which would otherwise record an interrupted run as FINISHED."""
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        mlflow.end_run(status=status)
        logger.warning("MLflow run %s ended early; marked %s.", run.info.run_id, status)


_exit_handler_registered = False


def guard_interruptions() -> Any:
    """While a run is active: SIGTERM unwinds like Ctrl-C, and an exit with the run still open
    marks it KILLED (atexit handlers run last-registered first, so before MLflow's). Returns
    the previous SIGTERM handler, for ``restore_signals``."""
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(end_run_left_open, "KILLED")
        _exit_handler_registered = True

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        return None


def restore_signals(previous: Any) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass


def run_identity_tags() -> dict[str, str]:
    """Tags that let a later run tell a live run from one whose process was killed."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: f"{time.time():.0f}"}


def identity_tag(tags: dict[str, str], name: str) -> str | None:
    """``tags[name]``, also from runs tagged before the tags were hidden (``clip_continual.pid``)."""
    return tags.get(name, tags.get(name.removeprefix("mlflow.")))


def heartbeat() -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag(HEARTBEAT_TAG, f"{time.time():.0f}")


def process_gone(tags: dict[str, str]) -> bool:
    pid_text = identity_tag(tags, PID_TAG) or ""
    if identity_tag(tags, HOST_TAG) != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's run: only its heartbeat tells
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def close_abandoned_runs(uri: str, experiment_name: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this machine whose process is gone (SIGKILL, power loss)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    closed = []
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
        if process_gone(run.data.tags):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            logger.warning("MLflow run %s (%s) was left RUNNING by a process that is gone; marked KILLED.",
                           run.info.run_id, run.info.run_name)
    return closed


# --- what a run logs ---------------------------------------------------------------------------

CONTINUAL_GROUP, PRETRAINING_GROUP, LEGACY_TASK_GROUP = "continual", "pretraining", "task"
# What a task cost (its training summary, training/costs.py), logged as ``cost/<name>`` at
# step = task index; runs logged before the cost group have the first three as ``task/<name>``.
TASK_COSTS = ("trainable_parameters", "wall_time_s", "median_step_time_s", "device_hours", "peak_memory_mib",
              "stored_parameters", "extra_storage_mib", "images_seen", "forward_passes_per_step",
              "teacher_forward_passes_per_step", "backward_passes_per_step")
# What the whole sequence cost (the sums over the tasks this run trained), at the last step.
RUN_COSTS = {"total_wall_time_s": "wall_time_s", "total_device_hours": "device_hours",
             "total_images_seen": "images_seen"}
TRAINED_IN = "mlflow_run_id"  # a training summary's key: the MLflow run that trained the task
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Parameters that say how a run is tracked, not what it computes: not logged as run parameters.
UNLOGGED_PARAMETERS = frozenset({"tracking", "runtime_overrides"})
RECIPE_PREFIX = "recipe."
NO_ALPHA = "none"  # the recipe.alpha of a method without a distillation weight (ft)


def metric_name(name: str, group: str = CONTINUAL_GROUP) -> str:
    """``continual/ut_acc``: the MLflow UI shows each group (before the slash) as a section."""
    return f"{group}/{name}" if group else name


RETRIEVAL_GROUP, COST_GROUP = "retrieval", "cost"
RETRIEVAL_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def final_metric_name(name: str) -> str:
    """Where a run's headline metric lives: ``retrieval/i2t_r1``, ``continual/ut_acc``."""
    return metric_name(name, RETRIEVAL_GROUP if name in RETRIEVAL_METRICS else CONTINUAL_GROUP)


def legacy_metric_name(name: str) -> str:
    """The name runs logged before the retrieval group (``continual/i2t_r1``), still read."""
    return metric_name(name, CONTINUAL_GROUP)


def _per_set_keys(values: dict[str, Any], prefix: str, depth: int) -> dict[str, list[str]]:
    """``{set: [keys]}`` of the per-set entries ``<prefix>/<set>[/<metric>]`` of ``values``."""
    sets: dict[str, list[str]] = {}
    for key in values:
        parts = key.split("/")
        if parts[0] == prefix and len(parts) == depth:
            sets.setdefault(parts[1], []).append(key)
    return sets


def step_metric_names(values: dict[str, Any]) -> dict[str, str]:
    """A step's evaluation keys -> one MLflow name each, none twice: headline retrieval recalls
    as ``retrieval/<recall>`` (the suite's first retrieval set), the others as
    ``continual/<name>``. A set's own ``zs_acc/<set>`` only beside other zero-shot sets (alone,
    it is ``zs_acc``), a retrieval set's own recalls only for the sets after the first."""
    zero_shot = _per_set_keys(values, "zs_acc", 2)
    retrieval = _per_set_keys(values, "retrieval", 3)
    repeated = set(zero_shot.get(next(iter(zero_shot)), []) if len(zero_shot) == 1 else [])
    repeated |= set(retrieval.get(next(iter(retrieval)), []) if retrieval else [])
    names = {}
    for key in values:
        if key in repeated:
            continue
        if key in RETRIEVAL_METRICS or key.startswith("retrieval/"):
            names[key] = metric_name(key.removeprefix("retrieval/"), RETRIEVAL_GROUP)
        else:
            names[key] = metric_name(key)
    return names


def step_metric_history(values: dict[str, Any], step: int) -> dict[str, dict[str, float]]:
    """``metric_history`` of a step's evaluation, under ``step_metric_names``."""
    names = step_metric_names(values)
    plain = metric_history({k: v for k, v in values.items() if k in names}, "", step)
    return {names[key]: point for key, point in plain.items()}


def metric_history(values: dict[str, Any], group: str, step: int) -> dict[str, dict[str, float]]:
    """Every finite number of ``values`` (whatever metrics it holds; ``step`` itself left out)
    in kedro-mlflow's metric-history form, named ``<group>/<name>``, at ``step``."""
    return {
        metric_name(name, group): {"value": float(value), "step": int(step)}
        for name, value in values.items()
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    }


def active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def paid_costs(summary: dict[str, Any] | None) -> dict[str, Any]:
    """A task's TASK_COSTS when the active run trained it (``TRAINED_IN``); none when the run
    only took the task from disk (``--only-missing-outputs``): a cost is charged only to the
    run that paid it."""
    if not summary or summary.get(TRAINED_IN) != active_run_id():
        return {}
    return {name: summary[name] for name in TASK_COSTS if name in summary}


def run_costs(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """RUN_COSTS over the tasks the active run trained (none when it trained none)."""
    paid = [costs for costs in map(paid_costs, summaries) if costs]
    return {total: sum(costs.get(name, 0.0) for costs in paid) for total, name in RUN_COSTS.items()} if paid else {}


def parameters_to_log(inputs: dict[str, Any]) -> dict[str, Any]:
    """A node's inputs as the run's parameters should show them: without the tracking settings
    and without the ``continual_learning`` blocks, whose resolved values the run logs instead as
    its recipe (``recipe.*``, see ``log_recipe``)."""
    return {name: value for name, value in inputs.items()
            if name.removeprefix("params:") not in UNLOGGED_PARAMETERS
            and name.rpartition(".")[2].removeprefix("params:") != "continual_learning"}


def log_recipe(recipe: Any) -> None:
    """The settings every task trained with, as params ``recipe.<setting>`` (and
    ``recipe.<task>/<setting>`` where tasks differ): what the run used, whatever level of the
    configuration set it."""
    import mlflow

    logged = {f"{RECIPE_PREFIX}{key}": value for key, value in recipe.params_to_log().items()}
    # MLflow's compare plot draws a run without a numeric parameter at the top of its axis (ft at
    # alpha 1.01): "none" makes the axis categorical, with ft apart from every weight.
    logged.setdefault(f"{RECIPE_PREFIX}alpha", NO_ALPHA)
    items = list(logged.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[start:start + 100]))


def rename_session_tag(run_id: str) -> None:
    """kedro-mlflow tags a run with Kedro's session id as ``run_id``, which the run page shows
    beside MLflow's own Run ID: call it ``kedro_session_id``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    session = client.get_run(run_id).data.tags.get("run_id")
    if session is not None:
        client.set_tag(run_id, "kedro_session_id", session)
        client.delete_tag(run_id, "run_id")


def mark_experiment_kind(uri: str, experiment_name: str) -> None:
    """Tag the experiment as model development, so MLflow 3's UI opens it on its runs (not on
    an empty GenAI overview); also for an experiment created before the tag was configured."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None and EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


# --- variants: a method with the settings a run changed ----------------------------------------

# Settings that change how a run is shown or where it runs, not what it computes.
_NOT_A_VARIANT = frozenset({"alpha", "progress", "log_every", "device", "distributed", *SPEED_SWITCHES})


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, dict) or not tree:
        return {path: tree}
    # ``--params a.b=1`` may arrive as {"a.b": 1}: a dotted key is a path too.
    return {leaf: value for key, child in tree.items()
            for leaf, value in _leaves(child, (*path, *str(key).split("."))).items()}


def _variant_setting(path: tuple[str, ...], method: str | None) -> str | None:
    """``continual_learning.training.lr`` -> ``lr``; ``coco_ost.continual_learning.training.lr``
    -> ``coco_ost.lr``; ``continual_learning.methods.icarl.per_class`` -> ``per_class`` (for
    icarl only); the embedded start model's settings (``data_preparation.glyphs.count`` ->
    ``glyphs.count``, ``pretraining.steps``, ``model.architecture``): a run from another start
    model is another variant; None for what is not a training setting."""
    if path[:1] and path[0] in START_MODEL_BLOCKS:
        if _NOT_A_VARIANT & set(path) or path[-1] == "cache_dir":
            return None
        return ".".join(path[1:] if path[0] == "data_preparation" else path)
    if "continual_learning" in path:
        owner = path[:path.index("continual_learning")]  # a named benchmark's own block
        rest = path[len(owner) + 1:]
    elif path[:1] == ("vocabulary_replay",):
        owner, rest = (), path
    else:
        return None
    if rest[:1] == ("training",):
        rest = rest[1:]
    elif rest[:1] == ("methods",):
        rest = rest[2:] if rest[1:2] == (method,) else ()
    if not rest or _NOT_A_VARIANT & set(rest):
        return None
    return ".".join((*owner, *rest))


def variant_overrides(params: dict[str, Any], defaults: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The training settings of ``params`` (a run's ``--params``) that differ from conf/base, by
    short name (``lr``, ``steps``, ``per_class``, ``glyphs.count``): what makes ``moe_adapters``
    at lr 1e-3 a variant of its own in ``compare``. Looks at every ``continual_learning`` block
    (the benchmarks' own included), the method's own options only, the replayed vocabulary and
    the embedded start model's settings; the seed, data paths and the like are not variants."""
    base, overrides = _leaves(defaults), {}
    for path, value in _leaves(params).items():
        name = _variant_setting(path, method)
        if name and base.get(path, object()) != value:
            overrides[name] = value
    return overrides


def variant_label(method: str | None, alpha: Any, overrides: dict[str, Any]) -> str | None:
    """``vr_lwf (alpha=1.0)``, ``moe_adapters (lr=0.001)``, ``ft``: one row per label in compare."""
    settings = ([] if alpha in (None, "None", "null", "", NO_ALPHA) else [f"alpha={alpha}"]) + [
        f"{key}={value}" for key, value in sorted(overrides.items())]
    return f"{method} ({', '.join(settings)})" if settings and method else method
