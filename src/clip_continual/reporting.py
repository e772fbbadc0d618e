"""Tables, summaries and figures from the per-step results of ``evaluation.evaluate_step``.

Plain Python, pandas and matplotlib; no Kedro import. Figures are built on the Agg canvas
directly (never through pyplot), so nothing is left in a global figure registry. Accuracies are
fractions in [0, 1] everywhere: tables, JSON, MLflow and the figures' axes. Every figure is
titled with the run it shows (``run_key.run_name``: benchmark/method/alpha/seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clip_continual.evaluation import RETRIEVAL_KEYS, continual_metrics
from clip_continual.sequence_evaluation import class_incremental_summary

METRIC_COLUMNS = ("step", "task", "ut_acc", "zs_acc", "a_acc", "bwt", *RETRIEVAL_KEYS)
SEQUENCE_COLUMNS = ("transfer", "avg", "last", "cil_acc")  # MTIL / class-incremental runs only
FINAL_KEYS = ("ut_acc", "zs_acc", "a_acc", "bwt", *RETRIEVAL_KEYS, "ut_top1")
COMPARISON_COLUMNS = ("method", "ut_acc", "zs_acc", "a_acc", "bwt", "i2t_r1", "t2i_r1")


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
    ordered = _sorted_results(step_results)
    extra = [key for key in SEQUENCE_COLUMNS if any(key in result for result in ordered)]
    columns = [*METRIC_COLUMNS, *extra]
    rows = [
        {
            "step": int(result["step"]),
            "task": str(result.get("task", "")),
            **{key: _number(result.get(key)) for key in columns[2:]},
        }
        for result in ordered
    ]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({"step": "int64", **{key: "float64" for key in columns[2:]}})


def accuracy_matrix(step_results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Accuracy on each task (columns task_1..task_T) after each step (rows, indexed by task name)."""
    ordered = _sorted_results(step_results)
    rows = [[float(v) for v in result["acc_row"]] for result in ordered]
    widths = {len(row) for row in rows}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every acc_row must have the same non-zero length (T), got lengths {sorted(widths)}")
    num_tasks = widths.pop()
    index = pd.Index([str(result.get("task", result["step"])) for result in ordered], name="after")
    # MTIL names its columns by dataset, class-incremental runs by phase
    columns = ordered[-1].get("acc_columns") or [f"task_{i}" for i in range(1, num_tasks + 1)]
    return pd.DataFrame(rows, index=index, columns=list(columns))


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
    if all("cil_acc" in result for result in ordered):
        # class-incremental (ZSCL cil/main.py): Avg and Last of the accuracy on the seen classes
        metrics.update({**class_incremental_summary(ordered), "transfer": None})
    info = dict(method_info or {})
    clashes = sorted(set(info) & set(metrics))
    if clashes:
        raise ValueError(f"method info keys {clashes} clash with metric names; rename them")
    return {**info, **metrics}


def comparison_table(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per method: final UT/ZS/A-Acc, BWT and R@1 both ways (NaN where a run lacks one).

    Each run is a flat dict with a 'method' name and its final metrics, e.g. a ``summary``.
    """
    unnamed = [i for i, run in enumerate(runs) if not run.get("method")]
    if unnamed:
        raise ValueError(f"runs {unnamed} have no 'method' name")
    names = [str(run["method"]) for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} appear twice; give each run a distinct name (e.g. 'vr_lwf a=2')")
    rows = [{"method": name, **{key: _number(run.get(key)) for key in COMPARISON_COLUMNS[1:]}}
            for name, run in zip(names, runs)]
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


# --- figures ----------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _titled(axes: Any, what: str, run: str | None) -> None:
    axes.set_title(f"{run}\n{what}" if run else what, fontsize=10)


def _task_label(column: str, classes: Sequence[str] | None) -> str:
    return f"{column}\n({', '.join(classes)})" if classes else column


def accuracy_matrix_figure(matrix: pd.DataFrame, run: str | None = None,
                           task_classes: Sequence[Sequence[str]] | None = None) -> Figure:
    """Heatmap of the accuracy matrix (fractions), each cell annotated. ``run`` titles it;
    ``task_classes[i]`` names the classes of task i + 1 under its column."""
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    figure = _new_figure(2.4 + 1.0 * n_cols, 2.0 + 0.5 * n_rows)
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for row in range(n_rows):
        for col in range(n_cols):
            value = values[row, col]
            if np.isfinite(value):
                # Dark text on the bright (high) end of viridis, light text elsewhere.
                axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.6 else "white")
    classes = list(task_classes or [None] * n_cols)
    axes.set_xticks(range(n_cols), [_task_label(str(c), k) for c, k in zip(matrix.columns, classes)],
                    fontsize=8)
    axes.set_yticks(range(n_rows), [str(i) for i in matrix.index])
    all_classes = sum(len(k) for k in classes if k)
    axes.set_xlabel(
        "accuracy on the task's classes (mean per class); each test image is classified among "
        + (f"all {all_classes} class prompts" if all_classes else "all class prompts")
        + " of the updated task", fontsize=8)
    axes.set_ylabel(f"model {matrix.index.name or 'after'}")
    _titled(axes, "UT accuracy matrix (0-1)", run)
    figure.colorbar(image, ax=axes, label="accuracy (0-1)")
    return figure


def metric_curves_figure(table: pd.DataFrame, run: str | None = None) -> Figure:
    """UT-Acc, ZS-Acc and A-Acc (top) and BWT (bottom), fractions, against the step."""
    steps = table["step"].to_numpy()
    figure = _new_figure(6.0, 5.0)
    accuracy_axes, bwt_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for column, label in (("ut_acc", "UT-Acc"), ("zs_acc", "ZS-Acc"), ("a_acc", "A-Acc")):
        accuracy_axes.plot(steps, table[column].to_numpy(dtype=float), marker="o", label=label)
    accuracy_axes.set_ylim(0.0, 1.0)
    accuracy_axes.set_ylabel("accuracy (0-1)")
    accuracy_axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    accuracy_axes.grid(alpha=0.3)
    bwt_axes.plot(steps, table["bwt"].to_numpy(dtype=float), marker="o", color="tab:red")
    bwt_axes.axhline(0.0, color="grey", linewidth=0.8)
    bwt_axes.set_ylabel("BWT")
    bwt_axes.set_xlabel("step (0 = starting model)")
    bwt_axes.set_xticks(steps)
    bwt_axes.grid(alpha=0.3)
    _titled(accuracy_axes, "Metrics after each continual step", run)
    return figure


def comparison_figure(table: pd.DataFrame, run: str | None = None) -> Figure:
    """ZS-Acc against UT-Acc (fractions) per method, each point labelled; dashed lines of
    equal A-Acc. ``run`` says what was compared (benchmark, seed)."""
    figure = _new_figure(6.0, 5.0)
    axes = figure.add_subplot()
    ut = table["ut_acc"].to_numpy(dtype=float)
    zs = table["zs_acc"].to_numpy(dtype=float)
    # Along ut + zs = 2 * a the A-Acc is constant: better trade-offs lie up and to the right.
    for a_acc in np.arange(0.1, 1.0, 0.1):
        axes.plot([0, 1], [2 * a_acc, 2 * a_acc - 1], color="lightgrey", linestyle="--", linewidth=0.7, zorder=0)
    for index, (name, x, y) in enumerate(zip(table["method"], ut, zs)):
        if np.isfinite(x) and np.isfinite(y):
            axes.scatter(x, y, s=40)
            # Alternate label sides so methods with close results stay readable.
            axes.annotate(str(name), (x, y), textcoords="offset points", fontsize=9,
                          xytext=(6, 5) if index % 2 == 0 else (6, -12))
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("UT-Acc (0-1)")
    axes.set_ylabel("ZS-Acc (0-1)")
    _titled(axes, "UT-Acc vs ZS-Acc (dashed: equal A-Acc)", run)
    axes.grid(alpha=0.3)
    return figure
