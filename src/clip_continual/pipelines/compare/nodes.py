"""Method comparison across finished MLflow runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from kedro.utils import find_kedro_project
from matplotlib.figure import Figure

from clip_continual import reporting
from clip_continual.tracking import latest_finished_runs, tracking_uri


def compare_methods(tracking: dict[str, Any], params: dict[str, Any]
                    ) -> tuple[pd.DataFrame, pd.DataFrame, Figure]:
    """Mean and standard deviation over seeds per method, every run's own row, and the plot."""
    # The same default store as the tracking hook's: the project's, also from a subfolder.
    uri = tracking_uri(tracking.get("uri"), find_kedro_project(Path.cwd()) or Path.cwd())
    runs = latest_finished_runs(uri, params["experiment_name"], params.get("benchmark"))
    table = reporting.comparison_table(runs)
    return table, reporting.comparison_runs_table(runs), reporting.comparison_figure(table)
