"""Reports of a finished continual sequence: table, accuracy matrix, summary and plots."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from clip_continual import reporting


def report_continual_run(
    method: str, params: dict[str, Any], *evaluations: dict[str, Any], benchmark: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], Figure, Figure]:
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
    )
