"""Tables, summaries and figures from the per-step results of ``evaluation.evaluate_step``.

Plain Python, pandas and matplotlib; no Kedro import. Figures are built on the Agg canvas
directly (never through pyplot), so nothing is left in a global figure registry. Tables keep
fractions in [0, 1]; figures show percentages, as the papers do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clip_continual.evaluation import RETRIEVAL_KEYS, continual_metrics, learning_accuracies

METRIC_COLUMNS = ("step", "task", "ut_acc", "zs_acc", "a_acc", "bwt", "learning_acc", "seen_acc",
                  *RETRIEVAL_KEYS)
FINAL_KEYS = ("ut_acc", "zs_acc", "a_acc", "bwt", "seen_acc", *RETRIEVAL_KEYS, "ut_top1")
COMPARISON_METRICS = ("ut_acc", "zs_acc", "a_acc", "bwt", "mean_learning_acc", "i2t_r1", "t2i_r1")


def _sorted_results(step_results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    missing = [i for i, result in enumerate(step_results) if "step" not in result]
    if missing:
        raise ValueError(f"step results {missing} have no 'step' key")
    ordered = sorted(step_results, key=lambda result: int(result["step"]))
    steps = [int(result["step"]) for result in ordered]
    if len(set(steps)) != len(steps):
        raise ValueError(f"step results repeat a step: {steps}")
    return ordered


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _json_number(value: float) -> float | None:
    """JSON has no NaN: an undefined metric becomes None."""
    return None if value is None or not math.isfinite(value) else float(value)


def metrics_table(step_results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per step (sorted), columns METRIC_COLUMNS; a missing metric is NaN."""
    rows = [
        {
            "step": int(result["step"]),
            "task": str(result.get("task", "")),
            **{key: _number(result.get(key)) for key in METRIC_COLUMNS[2:]},
        }
        for result in _sorted_results(step_results)
    ]
    table = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    return table.astype({"step": "int64", **{key: "float64" for key in METRIC_COLUMNS[2:]}})


def accuracy_matrix(step_results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Accuracy on each task (columns task_1..task_T) after each step (rows, indexed by task name)."""
    ordered = _sorted_results(step_results)
    rows = [[float(v) for v in result["acc_row"]] for result in ordered]
    widths = {len(row) for row in rows}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every acc_row must have the same non-zero length (T), got lengths {sorted(widths)}")
    num_tasks = widths.pop()
    index = pd.Index([str(result.get("task", result["step"])) for result in ordered], name="after")
    return pd.DataFrame(rows, index=index, columns=[f"task_{i}" for i in range(1, num_tasks + 1)])


def _full_matrix(step_results: Sequence[dict[str, Any]]) -> np.ndarray:
    """The (T + 1, T) matrix; continual metrics need every step 0..T."""
    matrix = accuracy_matrix(step_results).to_numpy()
    steps = [int(result["step"]) for result in _sorted_results(step_results)]
    expected = list(range(matrix.shape[1] + 1))
    if steps != expected:
        raise ValueError(
            f"continual metrics need the results of steps {expected} (0 = starting model), got steps {steps}"
        )
    return matrix


def summary(step_results: Sequence[dict[str, Any]], method_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Method info + final-step metrics + starting-model accuracies + continual metrics (JSON-ready).

    Undefined values (no retrieval set; Transfer with a single task) are None.
    """
    matrix = _full_matrix(step_results)
    ordered = _sorted_results(step_results)
    first, final = ordered[0], ordered[-1]
    metrics: dict[str, Any] = {"num_tasks": matrix.shape[1]}
    metrics.update({key: _json_number(_number(final.get(key))) for key in FINAL_KEYS if key in final})
    metrics["start_ut_acc"] = _json_number(_number(first.get("ut_acc")))
    metrics["start_zs_acc"] = _json_number(_number(first.get("zs_acc")))
    metrics.update({key: _json_number(value) for key, value in continual_metrics(matrix).items()})
    metrics["learning_accs"] = [_json_number(value) for value in learning_accuracies(matrix)]
    info = dict(method_info or {})
    clashes = sorted(set(info) & set(metrics))
    if clashes:
        raise ValueError(f"method info keys {clashes} clash with metric names; rename them")
    return {**info, **metrics}


def _comparison_rows(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: method, seed and COMPARISON_METRICS; a (method, seed) pair once only."""
    unnamed = [i for i, run in enumerate(runs) if not run.get("method")]
    if unnamed:
        raise ValueError(f"runs {unnamed} have no 'method' name")
    keys = [(str(run["method"]), run.get("seed")) for run in runs]
    repeated = sorted({f"{m} (seed {s})" if s is not None else m for m, s in keys if keys.count((m, s)) > 1})
    if repeated:
        raise ValueError(f"{repeated} appear twice; give each run a distinct name (e.g. 'vr_lwf a=2') or seed")
    rows = [{"method": method, "seed": seed, **{key: _number(run.get(key)) for key in COMPARISON_METRICS}}
            for (method, seed), run in zip(keys, runs)]
    return pd.DataFrame(rows, columns=["method", "seed", *COMPARISON_METRICS])


def comparison_runs_table(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Every run's final metrics, one row per method and seed."""
    return _comparison_rows(runs)


def comparison_table(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per method, in the order first seen: the number of seeds, then the mean of each of
    COMPARISON_METRICS over the seeds and its sample standard deviation (``<metric>_std``; NaN
    for a single seed). NaN where a run lacks a metric (it is left out of that metric's mean).

    Each run is a flat dict with a 'method' name, optionally a 'seed', and its final metrics.
    """
    rows = _comparison_rows(runs)
    grouped = rows.groupby("method", sort=False)[list(COMPARISON_METRICS)]
    table = grouped.mean().join(grouped.std(ddof=1).add_suffix("_std"))
    table.insert(0, "seeds", rows.groupby("method", sort=False).size())
    return table.reset_index()


# --- figures ----------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def accuracy_matrix_figure(matrix: pd.DataFrame) -> Figure:
    """Heatmap of the accuracy matrix, each cell annotated with its accuracy in %."""
    values = matrix.to_numpy(dtype=float) * 100.0
    n_rows, n_cols = values.shape
    figure = _new_figure(1.6 + 0.8 * n_cols, 1.2 + 0.5 * n_rows)
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=0.0, vmax=100.0, cmap="viridis", aspect="auto")
    for row in range(n_rows):
        for col in range(n_cols):
            value = values[row, col]
            if np.isfinite(value):
                # Dark text on the bright (high) end of viridis, light text elsewhere.
                axes.text(col, row, f"{value:.1f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 60.0 else "white")
    axes.set_xticks(range(n_cols), [str(c) for c in matrix.columns], rotation=45, ha="right")
    axes.set_yticks(range(n_rows), [str(i) for i in matrix.index])
    axes.set_xlabel("evaluated on")
    axes.set_ylabel(str(matrix.index.name or "after"))
    axes.set_title("Accuracy (%) after each step")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return figure


def metric_curves_figure(table: pd.DataFrame) -> Figure:
    """UT-Acc, ZS-Acc, A-Acc, learning and seen-class accuracy (top) and BWT (bottom) in %
    against the step."""
    steps = table["step"].to_numpy()
    figure = _new_figure(6.0, 5.0)
    accuracy_axes, bwt_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    curves = (("ut_acc", "UT-Acc", "-"), ("zs_acc", "ZS-Acc", "-"), ("a_acc", "A-Acc", "-"),
              ("learning_acc", "learning acc (task just learnt)", ":"),
              ("seen_acc", "seen-class acc", ":"))
    for column, label, style in curves:
        if column in table:
            accuracy_axes.plot(steps, table[column].to_numpy(dtype=float) * 100.0, marker="o",
                               linestyle=style, label=label)
    accuracy_axes.set_ylabel("accuracy (%)")
    accuracy_axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    accuracy_axes.grid(alpha=0.3)
    bwt_axes.plot(steps, table["bwt"].to_numpy(dtype=float) * 100.0, marker="o", color="tab:red")
    bwt_axes.axhline(0.0, color="grey", linewidth=0.8)
    bwt_axes.set_ylabel("BWT (%)")
    bwt_axes.set_xlabel("step (0 = starting model)")
    bwt_axes.set_xticks(steps)
    bwt_axes.grid(alpha=0.3)
    accuracy_axes.set_title("Metrics after each continual step")
    return figure


def _std_column(table: pd.DataFrame, metric: str) -> np.ndarray:
    column = f"{metric}_std"
    if column not in table:
        return np.full(len(table), np.nan)
    return table[column].to_numpy(dtype=float) * 100.0


def comparison_figure(table: pd.DataFrame) -> Figure:
    """ZS-Acc against UT-Acc (in %) per method, each point labelled, with error bars of one
    standard deviation over seeds where there are several; dashed lines of equal A-Acc."""
    figure = _new_figure(6.0, 5.0)
    axes = figure.add_subplot()
    ut = table["ut_acc"].to_numpy(dtype=float) * 100.0
    zs = table["zs_acc"].to_numpy(dtype=float) * 100.0
    # Along ut + zs = 2 * a the A-Acc is constant: better trade-offs lie up and to the right.
    for a_acc in range(10, 100, 10):
        axes.plot([0, 100], [2 * a_acc, 2 * a_acc - 100], color="lightgrey", linestyle="--", linewidth=0.7, zorder=0)
    ut_std, zs_std = (_std_column(table, column) for column in ("ut_acc", "zs_acc"))
    for index, (name, x, y, dx, dy) in enumerate(zip(table["method"], ut, zs, ut_std, zs_std)):
        if np.isfinite(x) and np.isfinite(y):
            # Error bars: one standard deviation over the seeds (none for a single seed).
            axes.errorbar(x, y, xerr=dx if np.isfinite(dx) else None, yerr=dy if np.isfinite(dy) else None,
                          fmt="o", markersize=6, capsize=3)
            # Alternate label sides so methods with close results stay readable.
            axes.annotate(str(name), (x, y), textcoords="offset points", fontsize=9,
                          xytext=(6, 5) if index % 2 == 0 else (6, -12))
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 100)
    axes.set_xlabel("UT-Acc (%)")
    axes.set_ylabel("ZS-Acc (%)")
    axes.set_title("Updated task vs zero-shot accuracy (dashed: equal A-Acc)")
    axes.grid(alpha=0.3)
    return figure
