"""Which MLflow runs are results: FINISHED with every step's metrics (an interrupted, failed,
still running or incomplete run is left out, with a warning why), the newest per method variant
and the seed it trained with, with their final metrics and what their tasks cost; ``compare``
reads them and logs which runs make each row.

Plain functions, no Kedro import.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from clip_continual.runtime.tracking import (
    COST_GROUP, FINAL_METRICS, HEARTBEAT_TAG, LEGACY_TASK_GROUP, RECIPE_PREFIX, VARIANT_TAG, final_metric_name,
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# How compare sums up a run's per-task costs (cost/<name>, one point per task it trained):
# its own column -> (the per-task cost, how the tasks' values combine).
RUN_COST_COLUMNS = {
    "trainable_parameters": ("trainable_parameters", max),  # MoE-Adapters freezes experts as it goes
    "stored_parameters": ("stored_parameters", max),
    "extra_storage_mib": ("extra_storage_mib", max),
    "peak_memory_mib": ("peak_memory_mib", max),
    "wall_time_per_task_s": ("wall_time_s", _mean),
    "device_hours": ("device_hours", sum),
    "images_seen": ("images_seen", sum),
    "forward_passes_per_step": ("forward_passes_per_step", _mean),
    "teacher_forward_passes_per_step": ("teacher_forward_passes_per_step", _mean),
    "backward_passes_per_step": ("backward_passes_per_step", _mean),
}


def task_costs(client: Any, run_id: str) -> dict[str, float | None]:
    """What a run's tasks cost (RUN_COST_COLUMNS; None for a cost it did not log): the most any
    task held, the mean over tasks of a task's wall time and passes per step, and the sums of
    device-hours and images seen over the tasks the run trained. Runs logged before the cost
    group have their first costs under ``task/``."""
    def history(name: str) -> list[float]:
        for group in (COST_GROUP, LEGACY_TASK_GROUP):
            points = client.get_metric_history(run_id, metric_name(name, group))
            if points:
                return [point.value for point in points]
        return []

    costs = {}
    for column, (name, combine) in RUN_COST_COLUMNS.items():
        values = history(name)
        costs[column] = combine(values) if values else None
    return costs


def trained_seed(run: Any) -> str | None:
    """The seed ``run`` trained with: its recipe's (``recipe.seed``); for a run logged before
    runs stated it, the seed parameter its benchmark read (``<benchmark>.seed`` for a named
    one, the top-level ``seed`` for the embedded default); None when it does not say."""
    from clip_continual.runtime.benchmarks import BENCHMARKS
    from clip_continual.runtime.recipe import seed_path_of

    params = run.data.params
    if f"{RECIPE_PREFIX}seed" in params:
        return params[f"{RECIPE_PREFIX}seed"]
    benchmark = BENCHMARKS.get(run.data.tags.get("benchmark"))
    return params.get(seed_path_of(benchmark) if benchmark else "seed")


def _label(run: Any) -> str:
    return f"{run.info.run_id} ({run.info.run_name})"


def choose_results(client: Any, runs: list[Any]) -> tuple[dict[tuple[str, str], Any], list[tuple[Any, str]]]:
    """From ``runs`` (newest first): the newest result per variant and seed, and every run left
    out with why. An older run of a variant and seed already kept is left out: two runs of one
    seed are one sample repeated, and averaging them would pass for a spread over seeds."""
    kept: dict[tuple[str, str], Any] = {}
    left_out: list[tuple[Any, str]] = []
    for run in runs:
        variant, seed = _variant(run), trained_seed(run)
        if variant is None:
            left_out.append((run, "no method tag (not a continual run)"))
        elif seed is None:
            left_out.append((run, f"{variant}: does not say which seed it trained with (no {RECIPE_PREFIX}seed)"))
        elif (variant, seed) in kept:
            newer = kept[variant, seed].info.run_id
            left_out.append((run, f"older duplicate of {variant}, seed {seed}: run {newer} is the newer one"))
        else:
            reason = why_not_a_result(client, run)
            if reason:
                left_out.append((run, f"{variant}, seed {seed}: {reason}"))
            else:
                kept[variant, seed] = run
    return kept, left_out


def log_grouping(kept: dict[tuple[str, str], Any], left_out: list[tuple[Any, str]]) -> None:
    """Which runs make each row of the comparison, and which were left out and why."""
    rows: dict[str, list[str]] = {}
    for (variant, seed), run in sorted(kept.items(), key=lambda item: (item[0][0], item[0][1].rjust(12))):
        rows.setdefault(variant, []).append(f"seed {seed}: {_label(run)}")
    for variant, members in rows.items():
        logger.info("compare: row '%s' averages %d run(s): %s", variant, len(members), "; ".join(members))
    for run, reason in left_out:
        logger.warning("compare: left out run %s: %s", _label(run), reason)


def _row(client: Any, variant: str, seed: str, run: Any) -> dict[str, Any]:
    return {
        "method": variant,
        "seed": int(seed) if seed.lstrip("-").isdigit() else seed,
        "run_id": run.info.run_id,
        **{name: final_metric(run.data.metrics, name) for name in FINAL_METRICS},
        **task_costs(client, run.info.run_id),
    }


def latest_finished_runs(uri: str, experiment_name: str, benchmark: str | None) -> list[dict[str, Any]]:
    """The newest complete FINISHED run per method variant and the seed it trained with (of
    ``benchmark``, if given), with its final metrics and seed. Each alpha of a method that has
    one is its own variant, e.g. ``vr_lwf (alpha=1.0)``, so a sweep does not hide the default
    run. Logs which runs make each row and which were left out and why (not finished,
    incomplete, an older duplicate of the same variant and seed, no seed)."""
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
    kept, left_out = choose_results(client, runs)
    log_grouping(kept, left_out)
    if not kept:
        raise NoRunsToCompare(
            f"experiment '{experiment_name}' has no complete finished runs"
            + (f" of benchmark '{benchmark}'" if benchmark else "")
            + ": run e.g. `kedro run --params method=ft` and `kedro run --params method=vr_lwf` first"
        )
    rows = [_row(client, variant, seed, run) for (variant, seed), run in kept.items()]
    return sorted(rows, key=lambda row: (row["method"], str(row["seed"]).rjust(12)))
