"""Reports of a finished continual sequence: table, accuracy matrix, summary and plots."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from clip_continual import reporting


def report_continual_run(
    method: str, params: dict[str, Any], *evaluations: dict[str, Any], benchmark: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], Figure, Figure, pd.DataFrame]:
    """The latest run's reports, and its metrics table once more for the run's own folder
    (``<benchmark>.continual_metrics``): that copy is missing for a new or resumed run, so
    ``--only-missing-outputs`` never skips its report because another run's reports exist."""
    steps = list(evaluations)
    table = reporting.metrics_table(steps)
    matrix = reporting.accuracy_matrix(steps)
    summary = reporting.summary(
        steps, {"benchmark": benchmark, "method": method, "alpha": params.get("alpha")}
    )
    return (
        table,
        matrix.reset_index(),
        summary,
        reporting.accuracy_matrix_figure(matrix),
        reporting.metric_curves_figure(table),
        table,
    )
