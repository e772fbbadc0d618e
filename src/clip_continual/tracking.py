"""MLflow tracking: where the store is, how parameters are flattened, and metric logging that
is a no-op when no run is active (so the science runs the same with tracking off)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

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


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters -> ``{"a.b.c": "value"}`` (MLflow parameters are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """Log finite numeric metrics to the active MLflow run, if there is one."""
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    if clean:
        mlflow.log_metrics(clean, step=int(step))


FINAL_METRICS = ("ut_acc", "zs_acc", "a_acc", "bwt", "mean_learning_acc", "seen_acc",
                 "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


class NoRunsToCompare(LookupError):
    """The experiment has no finished runs to compare."""


def latest_finished_runs(uri: str, experiment_name: str, benchmark: str | None) -> list[dict[str, Any]]:
    """The newest FINISHED run per method variant and seed (of ``benchmark``, if given), with
    its final metrics and seed. Each alpha of a method that has one is its own variant, e.g.
    ``vr_lwf (alpha=1.0)``, so a sweep does not hide the default run."""
    from mlflow.tracking import MlflowClient

    from clip_continual.methods import METHODS, method_takes_alpha

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise NoRunsToCompare(
            f"no MLflow experiment '{experiment_name}' in {uri}: run `kedro run` (once per method) first"
        )
    query = "attributes.status = 'FINISHED'"
    if benchmark:
        query += f" and tags.benchmark = '{benchmark}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"])
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        method = run.data.tags.get("method")
        alpha = run.data.params.get("continual_learning.alpha", "None")
        weighted = alpha not in ("None", "null", "") and method in METHODS and method_takes_alpha(method)
        variant = f"{method} (alpha={alpha})" if weighted else method
        seed = run.data.params.get("seed", "")
        if method is None or (variant, seed) in latest or "zs_acc" not in run.data.metrics:
            continue
        latest[variant, seed] = {
            "method": variant,
            "seed": int(seed) if seed.lstrip("-").isdigit() else seed,
            "run_id": run.info.run_id,
            **{name: run.data.metrics.get(name) for name in FINAL_METRICS},
        }
    if not latest:
        raise NoRunsToCompare(
            f"experiment '{experiment_name}' has no finished runs"
            + (f" of benchmark '{benchmark}'" if benchmark else "")
            + ": run e.g. `kedro run --params method=ft` and `kedro run --params method=vr_lwf` first"
        )
    return sorted(latest.values(), key=lambda row: (row["method"], str(row["seed"]).rjust(12)))
