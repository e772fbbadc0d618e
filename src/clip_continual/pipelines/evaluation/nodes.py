"""Reports of a finished continual sequence: table, accuracy matrix, summary and plots."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from clip_continual.evaluation import reporting
from clip_continual.methods import METHODS, effective_alpha
from clip_continual.runtime.run_key import run_name
from clip_continual.runtime.tracking import COST_GROUP, CONTINUAL_GROUP, metric_history, run_costs

# Whole-run metrics of the summary, logged as ``continual/<name>`` at the last step.
SUMMARY_METRICS = ("mean_learning_acc", "mean_learning_acc_own")


def report_continual_run(
    method: str, params: dict[str, Any], seed: int, updated_test: Any, *evaluations: dict[str, Any],
    benchmark: str, phases: tuple[tuple[int, ...], ...],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], Figure, Figure, pd.DataFrame]:
    """The latest run's reports, and its metrics table once more for the run's own folder
    (``<benchmark>.run_metrics_archive``): that copy is missing for a new or resumed run, so
    ``--only-missing-outputs`` never skips its report because another run's reports exist.
    The plots are titled with the run's name and name each task's classes."""
    task_classes = [[updated_test.class_names[c] for c in phase] for phase in phases]
    return _reports(method, params, seed, list(evaluations), benchmark, task_classes)


def report_dataset_run(
    method: str, params: dict[str, Any], seed: int, *evaluations: dict[str, Any], benchmark: str,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], Figure, Figure, pd.DataFrame]:
    """The reports of a sequence of whole datasets (MTIL), whose columns name the datasets; the
    summary names the evaluation protocol (``evaluation.protocols``) the numbers were taken under."""
    protocol = {key: evaluations[-1][key] for key in PROTOCOL_KEYS if key in evaluations[-1]}
    return _reports(method, params, seed, list(evaluations), benchmark, None, protocol)


PROTOCOL_KEYS = ("task_identity", "label_space")


def _reports(method: str, params: dict[str, Any], seed: int, steps: list[dict[str, Any]], benchmark: str,
             task_classes: list[list[str]] | None, protocol: dict[str, str] | None = None):
    table = reporting.metrics_table(steps)
    matrix = reporting.accuracy_matrix(steps)
    alpha = effective_alpha(method, params.get("alpha")) if method in METHODS else params.get("alpha")
    summary = reporting.summary(
        steps, {"benchmark": benchmark, "method": method, "alpha": alpha, "seed": seed, **(protocol or {})}
    )
    title = run_name(benchmark, method, alpha, seed)
    return (
        table,
        matrix.reset_index(),
        summary,
        reporting.accuracy_matrix_figure(matrix, title, task_classes),
        reporting.metric_curves_figure(table, title),
        table,
    )


def summary_metrics_for_mlflow(summary: dict[str, Any], *training_summaries: dict[str, Any]) -> dict[str, Any]:
    """The summary's whole-run metrics (SUMMARY_METRICS) as MLflow metrics at the last step,
    and what the tasks this run trained cost together (``cost/total_<name>``)."""
    step = summary["num_tasks"]
    return (metric_history({k: summary[k] for k in SUMMARY_METRICS if k in summary}, CONTINUAL_GROUP, step)
            | metric_history(run_costs(list(training_summaries)), COST_GROUP, step))
