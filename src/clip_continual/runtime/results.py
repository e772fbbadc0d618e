"""Which MLflow runs are results: FINISHED with every step's metrics (an interrupted, failed,
still running or incomplete run is skipped, with a warning why), the newest per method variant
and seed, with their final metrics and what their tasks cost; ``compare`` reads them.

Plain functions, no Kedro import.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from clip_continual.runtime.tracking import (
    FINAL_METRICS, HEARTBEAT_TAG, RECIPE_PREFIX, TASK_GROUP, VARIANT_TAG, final_metric_name,
    identity_tag, legacy_metric_name, metric_name, process_gone, variant_label,
)

logger = logging.getLogger(__name__)


class NoRunsToCompare(LookupError):
    """The experiment has no finished runs to compare."""


def _expected_steps(benchmark: str | None) -> set[int] | None:
    from clip_continual.runtime.benchmarks import BENCHMARKS

    if benchmark not in BENCHMARKS:
        return None
    return set(range(len(BENCHMARKS[benchmark].phases) + 1))


def why_not_a_result(client: Any, run: Any) -> str | None:
    """None when ``run`` FINISHED with every step's metrics (0 = the start model .. T), else why not."""
    status = run.info.status
    if status != "FINISHED":
        if status == "RUNNING" and process_gone(run.data.tags):
            return "left RUNNING by a process that was killed"
        if status == "RUNNING":
            beat = identity_tag(run.data.tags, HEARTBEAT_TAG)
            since = f", last sign of life {time.time() - float(beat):.0f} s ago" if beat else ""
            return f"still RUNNING (or killed without a trace{since})"
        return {"KILLED": "KILLED (interrupted)", "FAILED": "FAILED (stopped by an error)"}.get(status, status)
    expected = _expected_steps(run.data.tags.get("benchmark"))
    if expected is None:
        return None if metric_name("zs_acc") in run.data.metrics else f"no {metric_name('zs_acc')} metric"
    logged = {m.step for m in client.get_metric_history(run.info.run_id, metric_name("zs_acc"))}
    missing = sorted(expected - logged)
    return f"incomplete sequence: no metrics for step(s) {missing}" if missing else None


def _variant(run: Any) -> str | None:
    from clip_continual.methods import METHODS, method_takes_alpha

    if VARIANT_TAG in run.data.tags:
        return run.data.tags[VARIANT_TAG]
    method = run.data.tags.get("method")  # runs logged before the variant tag
    alpha = run.data.params.get(f"{RECIPE_PREFIX}alpha", run.data.params.get("continual_learning.alpha", "None"))
    weighted = method in METHODS and method_takes_alpha(method)
    return variant_label(method, alpha if weighted else None, {})


def final_metric(metrics: dict[str, float], name: str) -> float | None:
    """A run's last value of ``name``, also from runs logged under the older names."""
    return metrics.get(final_metric_name(name), metrics.get(legacy_metric_name(name)))


def task_costs(client: Any, run_id: str) -> dict[str, float | None]:
    """What a run's tasks cost: the most parameters any task trained (MoE-Adapters freezes experts
    as it goes, so its count falls) and the mean wall time of a task's training."""
    def history(name: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run_id, metric_name(name, TASK_GROUP))]

    parameters, seconds = history("trainable_parameters"), history("wall_time_s")
    return {"trainable_parameters": max(parameters) if parameters else None,
            "wall_time_per_task_s": sum(seconds) / len(seconds) if seconds else None}


def latest_finished_runs(uri: str, experiment_name: str, benchmark: str | None) -> list[dict[str, Any]]:
    """The newest complete FINISHED run per method variant and seed (of ``benchmark``, if given),
    with its final metrics and seed. Each alpha of a method that has one is its own variant, e.g.
    ``vr_lwf (alpha=1.0)``, so a sweep does not hide the default run. Newer runs that are not
    results (interrupted, failed, still running, incomplete) are skipped, with a warning why."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise NoRunsToCompare(
            f"no MLflow experiment '{experiment_name}' in {uri}: run `kedro run` (once per method) first"
        )
    query = f"tags.benchmark = '{benchmark}'" if benchmark else ""
    runs = client.search_runs([experiment.experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"])
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        variant = _variant(run)
        seed = run.data.params.get(f"{RECIPE_PREFIX}seed", run.data.params.get("seed", ""))  # the seed it trained with
        if variant is None or (variant, seed) in latest:
            continue
        reason = why_not_a_result(client, run)
        if reason:
            logger.warning("compare: skipped run %s (%s, seed %s, %s): %s", run.info.run_id, variant,
                           seed, run.info.run_name, reason)
            continue
        latest[variant, seed] = {
            "method": variant,
            "seed": int(seed) if seed.lstrip("-").isdigit() else seed,
            "run_id": run.info.run_id,
            **{name: final_metric(run.data.metrics, name) for name in FINAL_METRICS},
            **task_costs(client, run.info.run_id),
        }
    if not latest:
        raise NoRunsToCompare(
            f"experiment '{experiment_name}' has no complete finished runs"
            + (f" of benchmark '{benchmark}'" if benchmark else "")
            + ": run e.g. `kedro run --params method=ft` and `kedro run --params method=vr_lwf` first"
        )
    return sorted(latest.values(), key=lambda row: (row["method"], str(row["seed"]).rjust(12)))
