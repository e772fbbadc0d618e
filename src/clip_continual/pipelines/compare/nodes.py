"""Method comparison across finished MLflow runs."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from clip_continual.evaluation import reporting
from clip_continual.runtime.results import latest_finished_runs
from clip_continual.runtime.tracking import probe_store


def compare_methods(params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, Figure, Figure]:
    """Mean and standard deviation over seeds per method variant (accuracies and costs), every
    run's own row, and the plots of UT-Acc against ZS-Acc and of A-Acc against cost; the log
    says which runs make each row and which were left out and why (``runtime/results.py``)."""
    # The store of conf/<env>/mlflow.yml, set up by kedro-mlflow when the session started.
    uri = mlflow.get_tracking_uri()
    probe_store(uri)
    runs = latest_finished_runs(uri, params["experiment_name"], params.get("benchmark"))
    table = reporting.comparison_table(runs)
    what = f"{params.get('benchmark') or 'every benchmark'}: latest finished run of each method and seed"
    return (table, reporting.comparison_runs_table(runs), reporting.comparison_figure(table, what),
            reporting.cost_accuracy_figure(table, what))
