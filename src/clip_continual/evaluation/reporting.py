"""Tables, summaries and figures from the per-step results of ``step.evaluate_step``.

Plain Python, pandas and matplotlib; no Kedro import. Figures are built on the Agg canvas
directly (never through pyplot), so nothing is left in a global figure registry. Accuracies are
fractions in [0, 1] everywhere: tables, JSON, MLflow and the figures' axes. Every figure is
titled with the run it shows (``run_key.run_name``: method, alpha, seed, benchmark).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clip_continual.evaluation.metrics import continual_metrics, learning_accuracies
from clip_continual.evaluation.retrieval import RETRIEVAL_KEYS
from clip_continual.evaluation.sequences import class_incremental_summary

METRIC_COLUMNS = ("step", "task", "ut_acc", "zs_acc", "a_acc", "bwt", "learning_acc", "learning_acc_own", "seen_acc",
                  *RETRIEVAL_KEYS)
SEQUENCE_COLUMNS = ("transfer", "avg", "last", "cil_acc")  # MTIL / class-incremental runs only
FINAL_KEYS = ("ut_acc", "zs_acc", "a_acc", "bwt", "seen_acc", *RETRIEVAL_KEYS, "ut_top1")
# What a run cost, from its cost/ metrics (runtime/results.py task_costs says how each is summed up).
COST_COLUMNS = ("trainable_parameters", "stored_parameters", "extra_storage_mib", "peak_memory_mib",
                "wall_time_per_task_s", "device_hours", "images_seen", "forward_passes_per_step",
                "teacher_forward_passes_per_step", "backward_passes_per_step")
# Final metrics, then the costs beside them.
COMPARISON_METRICS = ("ut_acc", "zs_acc", "a_acc", "bwt", "mean_learning_acc", "seen_acc", "i2t_r1", "t2i_r1",
                      *COST_COLUMNS)


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
    metrics["learning_accs"] = [_json_number(value) for value in learning_accuracies(matrix)]
    own = [result["learning_acc_own"] for result in ordered[1:] if result.get("learning_acc_own") is not None]
    if own:  # the tasks just learnt among their own classes (class-split benchmarks)
        metrics["mean_learning_acc_own"] = _json_number(float(np.mean(own)))
    if all("cil_acc" in result for result in ordered):
        # class-incremental (ZSCL cil/main.py): Avg and Last of the accuracy on the seen classes
        metrics.update({**class_incremental_summary(ordered), "transfer": None})
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
        raise ValueError(f"{repeated} appear twice: no mean over runs that share a seed; give each run a "
                         f"distinct name (e.g. 'vr_lwf a=2') or seed, or keep only the newest of each seed")
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
    Two runs of one method and seed are an error, not a flagged row: they are one sample
    repeated, and their mean and standard deviation would pass for a spread over seeds.
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


def _titled(axes: Any, what: str, run: str | None) -> None:
    axes.set_title(f"{run}\n{what}" if run else what, fontsize=10)


# A column of the accuracy matrix is 1.2 inches: about 20 characters at 8 points. Long class
# lists (COCO's 80 classes) are cut to a few lines, so the axes keep their room.
COLUMN_INCHES = 1.2
CLASS_LABEL_CHARACTERS = 20
CLASS_LABEL_LINES = 4


def _task_label(column: str, classes: Sequence[str] | None) -> str:
    if not classes:
        return column
    lines = textwrap.wrap(f"({', '.join(classes)})", width=CLASS_LABEL_CHARACTERS)
    if len(lines) > CLASS_LABEL_LINES:
        lines = lines[: CLASS_LABEL_LINES - 1] + [f"... {len(classes)} classes)"]
    return "\n".join([column, *lines])


def accuracy_matrix_figure(matrix: pd.DataFrame, run: str | None = None,
                           task_classes: Sequence[Sequence[str]] | None = None) -> Figure:
    """Heatmap of the accuracy matrix (fractions), each cell annotated. ``run`` titles it;
    ``task_classes[i]`` names the classes of task i + 1 under its column (the first few when
    there are many)."""
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    classes = list(task_classes or [None] * n_cols)
    labels = [_task_label(str(c), k) for c, k in zip(matrix.columns, classes)]
    label_lines = max((label.count("\n") + 1 for label in labels), default=1)
    width = 3.6 + COLUMN_INCHES * n_cols
    figure = _new_figure(width, 2.6 + 0.5 * n_rows + 0.15 * label_lines)
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for row in range(n_rows):
        for col in range(n_cols):
            value = values[row, col]
            if np.isfinite(value):
                # Dark text on the bright (high) end of viridis, light text elsewhere.
                axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.6 else "white")
    axes.set_xticks(range(n_cols), labels, fontsize=8)
    axes.set_yticks(range(n_rows), [str(i) for i in matrix.index])
    all_classes = sum(len(k) for k in classes if k)
    xlabel = ("accuracy on the task's classes (mean per class); each test image is classified among "
              + (f"all {all_classes} class prompts" if all_classes else "all class prompts")
              + " of the updated task")
    # About 14 characters per inch at 8 points; the colour bar takes an inch.
    axes.set_xlabel("\n".join(textwrap.wrap(xlabel, width=int(14 * (width - 1.5)))), fontsize=8)
    axes.set_ylabel(f"model {matrix.index.name or 'after'}")
    _titled(axes, "UT accuracy matrix (0-1)", run)
    figure.colorbar(image, ax=axes, label="accuracy (0-1)")
    return figure


def metric_curves_figure(table: pd.DataFrame, run: str | None = None) -> Figure:
    """UT-Acc, ZS-Acc, A-Acc, learning and seen-class accuracy (top) and BWT (bottom),
    fractions, against the step."""
    steps = table["step"].to_numpy()
    figure = _new_figure(6.0, 5.0)
    accuracy_axes, bwt_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    curves = (("ut_acc", "UT-Acc", "-"), ("zs_acc", "ZS-Acc", "-"), ("a_acc", "A-Acc", "-"),
              ("learning_acc", "learning acc (task just learnt)", ":"),
              ("learning_acc_own", "learning acc (among its own classes)", ":"),
              ("seen_acc", "seen-class acc", ":"))
    for column, label, style in curves:
        if column in table:
            accuracy_axes.plot(steps, table[column].to_numpy(dtype=float), marker="o",
                               linestyle=style, label=label)
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


def _std_column(table: pd.DataFrame, metric: str) -> np.ndarray:
    column = f"{metric}_std"
    if column not in table:
        return np.full(len(table), np.nan)
    return table[column].to_numpy(dtype=float)


MARKERS = "osD^vP*Xph<>"


def comparison_figure(table: pd.DataFrame, run: str | None = None) -> Figure:
    """ZS-Acc against UT-Acc (fractions) per method, each its own colour and marker, named in a
    legend beside the axes (labels on the points collide once a dozen methods are close), with
    error bars of one standard deviation over seeds where there are several; dashed lines of
    equal A-Acc. ``run`` says what was compared (benchmark, seed)."""
    figure = _new_figure(8.5, 5.0)
    axes = figure.add_subplot()
    ut = table["ut_acc"].to_numpy(dtype=float)
    zs = table["zs_acc"].to_numpy(dtype=float)
    # Along ut + zs = 2 * a the A-Acc is constant: better trade-offs lie up and to the right.
    for a_acc in np.arange(0.1, 1.0, 0.1):
        axes.plot([0, 1], [2 * a_acc, 2 * a_acc - 1], color="lightgrey", linestyle="--", linewidth=0.7, zorder=0)
    ut_std, zs_std = (_std_column(table, column) for column in ("ut_acc", "zs_acc"))
    colours = colormaps["tab10"]  # with 12 markers: 60 distinct (colour, marker) pairs
    for index, (name, x, y, dx, dy) in enumerate(zip(table["method"], ut, zs, ut_std, zs_std)):
        if np.isfinite(x) and np.isfinite(y):
            # Error bars: one standard deviation over the seeds (none for a single seed).
            axes.errorbar(x, y, xerr=dx if np.isfinite(dx) else None, yerr=dy if np.isfinite(dy) else None,
                          fmt=MARKERS[index % len(MARKERS)], color=colours(index % colours.N),
                          markersize=6, capsize=3, label=str(name))
    if axes.containers:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="method")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("UT-Acc (0-1)")
    axes.set_ylabel("ZS-Acc (0-1)")
    _titled(axes, "UT-Acc vs ZS-Acc (dashed: equal A-Acc)", run)
    axes.grid(alpha=0.3)
    return figure


# The costs set against A-Acc, each with its axis label; storage may be 0 (ft), hence symlog.
COST_AXES = (("wall_time_per_task_s", "wall time per task (s)", "log"),
             ("peak_memory_mib", "peak memory (MiB)", "log"),
             ("extra_storage_mib", "extra storage (MiB)", "symlog"),
             ("trainable_parameters", "trainable parameters", "log"))


def cost_accuracy_figure(table: pd.DataFrame, run: str | None = None) -> Figure:
    """A-Acc against what a method cost (COST_AXES), one panel per cost, each method in the
    colour and marker of ``comparison_figure``; error bars of one standard deviation over
    seeds. A cost a run did not log leaves its point out."""
    figure = _new_figure(11.0, 7.5)
    panels = figure.subplots(2, 2).ravel()
    colours = colormaps["tab10"]
    accuracy, accuracy_std = table["a_acc"].to_numpy(dtype=float), _std_column(table, "a_acc")
    for axes, (column, label, scale) in zip(panels, COST_AXES):
        cost = table[column].to_numpy(dtype=float) if column in table else np.full(len(table), np.nan)
        for index, (name, x, y, dx, dy) in enumerate(zip(table["method"], cost, accuracy,
                                                         _std_column(table, column), accuracy_std)):
            if np.isfinite(x) and np.isfinite(y):
                axes.errorbar(x, y, xerr=dx if np.isfinite(dx) else None, yerr=dy if np.isfinite(dy) else None,
                              fmt=MARKERS[index % len(MARKERS)], color=colours(index % colours.N),
                              markersize=6, capsize=3, label=str(name))
        axes.set_xscale(scale)
        axes.set_xlabel(label)
        axes.set_ylabel("A-Acc (0-1)")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside right upper", fontsize=8, title="method")
    figure.suptitle(f"{run}\nA-Acc against cost" if run else "A-Acc against cost", fontsize=10)
    return figure
