import json
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from clip_continual.evaluation import reporting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Same hand-built matrix as tests/test_evaluation.py: row 0 = starting model, T = 3.
R = np.array([
    [0.50, 0.40, 0.30],
    [0.90, 0.50, 0.35],
    [0.95, 0.80, 0.45],
    [0.60, 0.70, 0.90],
])
TASKS = ["zero_shot", "task_1", "task_2", "task_3"]


def _step_results(matrix=R, retrieval=True):
    results = []
    for step, row in enumerate(matrix):
        ut = float(row.mean() if step == 0 else row[:step].mean())
        zs = 0.6 - 0.1 * step
        result = {"step": step, "task": TASKS[step], "ut_acc": ut, "zs_acc": zs, "a_acc": (ut + zs) / 2,
                  "bwt": 0.0 if step < 2 else float(np.mean([row[i] - matrix[i + 1][i] for i in range(step - 1)])),
                  "learning_acc": float(row[step - 1]) if step else None, "seen_acc": ut + 0.05,
                  "ut_top1": ut, "acc_row": [float(v) for v in row]}
        for key in reporting.RETRIEVAL_KEYS:
            result[key] = 0.5 - 0.05 * step if retrieval else None
        results.append(result)
    return results


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0 and data.startswith(PNG_SIGNATURE)


def test_metrics_table_columns_and_order():
    results = _step_results()
    table = reporting.metrics_table(list(reversed(results)))
    assert list(table.columns) == ["step", "task", "ut_acc", "zs_acc", "a_acc", "bwt", "learning_acc",
                                   "learning_acc_own", "seen_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    assert np.isnan(table.loc[0, "learning_acc"]) and table.loc[2, "learning_acc"] == pytest.approx(0.8)
    assert table["step"].tolist() == [0, 1, 2, 3]
    assert table["task"].tolist() == TASKS
    assert table.loc[3, "bwt"] == pytest.approx(-0.2)


def test_metrics_table_without_retrieval_has_nan_and_rejects_repeats():
    table = reporting.metrics_table(_step_results(retrieval=False))
    assert table["i2t_r1"].isna().all()
    with pytest.raises(ValueError, match="repeat"):
        reporting.metrics_table(_step_results() + _step_results()[:1])


def test_accuracy_matrix():
    matrix = reporting.accuracy_matrix(_step_results())
    assert list(matrix.columns) == ["task_1", "task_2", "task_3"]
    assert list(matrix.index) == TASKS
    np.testing.assert_allclose(matrix.to_numpy(), R)
    ragged = _step_results()
    ragged[2]["acc_row"] = [0.1]
    with pytest.raises(ValueError, match="same non-zero length"):
        reporting.accuracy_matrix(ragged)


def test_summary_final_and_continual_metrics():
    result = reporting.summary(_step_results(), {"method": "vr_lwf", "alpha": 0.5})
    assert result["method"] == "vr_lwf" and result["alpha"] == 0.5
    assert result["num_tasks"] == 3
    assert result["ut_acc"] == pytest.approx(2.2 / 3)
    assert result["zs_acc"] == pytest.approx(0.3)
    assert result["start_zs_acc"] == pytest.approx(0.6)
    assert result["i2t_r1"] == pytest.approx(0.35)
    # hand values (see tests/test_evaluation.py)
    assert result["average_accuracy"] == pytest.approx(2.2 / 3)
    assert result["average_incremental_accuracy"] == pytest.approx((0.9 + 0.875 + 2.2 / 3) / 3)
    assert result["backward_transfer"] == pytest.approx(-0.2)
    assert result["bwt"] == pytest.approx(-0.2)
    assert result["forgetting"] == pytest.approx(0.225)
    assert result["forward_transfer"] == pytest.approx(0.125)
    assert result["transfer"] == pytest.approx(0.45)
    assert result["avg"] == pytest.approx(6.15 / 9)
    assert result["last"] == pytest.approx(2.2 / 3)
    assert result["learning_accs"] == pytest.approx([0.9, 0.8, 0.9])
    assert result["mean_learning_acc"] == pytest.approx(2.6 / 3)
    assert result["seen_acc"] == pytest.approx(2.2 / 3 + 0.05)
    json.dumps(result)


def test_summary_single_task_and_errors():
    single = _step_results(np.array([[0.3], [0.8]]), retrieval=False)
    result = reporting.summary(single, {"method": "ft"})
    assert result["transfer"] is None and result["i2t_r1"] is None
    assert result["last"] == pytest.approx(0.8)
    json.dumps(result)
    with pytest.raises(ValueError, match="steps"):
        reporting.summary(_step_results()[1:], {"method": "ft"})
    with pytest.raises(ValueError, match="clash"):
        reporting.summary(_step_results(), {"method": "ft", "forgetting": 1})


def test_comparison_table():
    runs = [reporting.summary(_step_results(), {"method": "vr_lwf"}),
            {"method": "ft", "ut_acc": 0.9, "zs_acc": 0.1, "a_acc": 0.5, "bwt": -0.3}]
    table = reporting.comparison_table(runs)
    assert list(table.columns[:10]) == ["method", "seeds", "ut_acc", "zs_acc", "a_acc", "bwt",
                                        "mean_learning_acc", "seen_acc", "i2t_r1", "t2i_r1"]
    assert table["method"].tolist() == ["vr_lwf", "ft"]
    assert table["seeds"].tolist() == [1, 1]
    assert table.loc[0, "ut_acc"] == pytest.approx(2.2 / 3)
    assert table.loc[0, "mean_learning_acc"] == pytest.approx(2.6 / 3)
    assert table.loc[0, "seen_acc"] == pytest.approx(2.2 / 3 + 0.05)
    assert np.isnan(table.loc[1, "i2t_r1"]) and np.isnan(table.loc[0, "ut_acc_std"])  # one seed: no std
    with pytest.raises(ValueError, match="twice"):
        reporting.comparison_table(runs + [runs[1]])
    with pytest.raises(ValueError, match="method"):
        reporting.comparison_table([{"ut_acc": 0.5}])


def test_comparison_over_seeds_gives_mean_sample_std_and_count():
    runs = [{"method": "ft", "seed": 0, "ut_acc": 0.2, "zs_acc": 0.5},
            {"method": "vr_lwf", "seed": 0, "ut_acc": 0.4, "zs_acc": 0.8},
            {"method": "ft", "seed": 1, "ut_acc": 0.4, "zs_acc": 0.3},
            {"method": "ft", "seed": 2, "ut_acc": 0.3, "zs_acc": None}]
    table = reporting.comparison_table(runs).set_index("method")
    assert table.loc["ft", "seeds"] == 3
    assert table.loc["ft", "ut_acc"] == pytest.approx(0.3)
    assert table.loc["ft", "ut_acc_std"] == pytest.approx(0.1)             # sample std (n - 1)
    assert table.loc["ft", "zs_acc"] == pytest.approx(0.4)                 # the missing value left out
    assert table.loc["ft", "zs_acc_std"] == pytest.approx(2 ** 0.5 * 0.1)
    assert np.isnan(table.loc["vr_lwf", "ut_acc_std"])
    per_run = reporting.comparison_runs_table(runs)
    assert per_run[["method", "seed"]].values.tolist() == [["ft", 0], ["vr_lwf", 0], ["ft", 1], ["ft", 2]]
    with pytest.raises(ValueError, match=r"ft \(seed 1\).* no mean over runs that share a seed"):
        reporting.comparison_table(runs + [{"method": "ft", "seed": 1}])
    figure = reporting.comparison_figure(reporting.comparison_table(runs))
    bars = [c for c in figure.axes[0].containers if c.has_xerr or c.has_yerr]
    assert len(bars) == 1  # only ft has several seeds
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["ft", "vr_lwf"]  # every method named once, beside the axes


def test_comparison_figure_tells_many_methods_apart():
    methods = [f"method_{i}" for i in range(17)]
    table = pd.DataFrame({"method": methods, "ut_acc": np.linspace(0.1, 0.5, 17), "zs_acc": 0.9})
    figure = reporting.comparison_figure(table)
    points = [container.lines[0] for container in figure.axes[0].containers]
    assert len(points) == 17
    assert len({(point.get_color(), point.get_marker()) for point in points}) == 17


def test_figures_are_written_as_png(tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    results = _step_results()
    figures = {
        "matrix": reporting.accuracy_matrix_figure(reporting.accuracy_matrix(results)),
        "curves": reporting.metric_curves_figure(reporting.metrics_table(results)),
        "comparison": reporting.comparison_figure(pd.DataFrame(
            {"method": ["ft", "vr_lwf", "broken"], "ut_acc": [0.9, 0.8, np.nan], "zs_acc": [0.2, 0.5, 0.4],
             "a_acc": [0.55, 0.65, np.nan], "bwt": [0.0, 0.0, 0.0], "i2t_r1": [0.1, 0.3, 0.2],
             "t2i_r1": [0.1, 0.2, 0.3]})),
        "costs": reporting.cost_accuracy_figure(pd.DataFrame(
            {"method": ["ft", "icarl"], "a_acc": [0.5, 0.6], "wall_time_per_task_s": [3.0, 6.0],
             "peak_memory_mib": [800.0, 900.0], "extra_storage_mib": [0.0, 7.5]})),
    }
    for name, figure in figures.items():
        assert isinstance(figure, Figure)
        path = tmp_path / f"{name}.png"
        figure.savefig(path)
        _assert_png(path)
    assert plt.get_fignums() == open_before  # nothing registered with pyplot
    curves_axes = figures["curves"].axes[1]
    assert list(curves_axes.get_xticks()) == [0, 1, 2, 3]


@pytest.mark.parametrize("tasks, classes_per_task", [(1, 1), (2, 80), (3, 10), (11, 3), (20, 5)])
def test_accuracy_matrix_figures_keep_room_for_their_axes(tasks, classes_per_task, tmp_path):
    """COCO's 80 classes a task, MTIL's 11 tasks: the class names under each column are cut to
    a few lines, so constrained layout never collapses the axes (matplotlib warns when it does)."""
    matrix = pd.DataFrame(np.full((tasks + 1, tasks), 0.5), columns=[f"task_{i + 1}" for i in range(tasks)])
    classes = [[f"class name {task}.{i}" for i in range(classes_per_task)] for task in range(tasks)]
    figure = reporting.accuracy_matrix_figure(matrix, "vr_lwf alpha=1 seed=0 on coco_ost", classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure.savefig(tmp_path / "matrix.png")
    ticks = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert all(tick.count("\n") <= reporting.CLASS_LABEL_LINES for tick in ticks)
    assert classes_per_task < 10 or ticks[-1].endswith(f"{classes_per_task} classes)")


def test_figures_name_the_run_the_task_classes_and_one_accuracy_unit():
    results = _step_results()
    run = "vr_lwf alpha=1 seed=0 on digits_mst"
    classes = [["zero", "one"], ["two", "three"], ["four", "five"]][: reporting.accuracy_matrix(results).shape[1]]
    matrix = reporting.accuracy_matrix_figure(reporting.accuracy_matrix(results), run, classes)
    curves = reporting.metric_curves_figure(reporting.metrics_table(results), run)
    comparison = reporting.comparison_figure(pd.DataFrame(
        {"method": ["ft"], "ut_acc": [0.9], "zs_acc": [0.2], "a_acc": [0.55], "bwt": [0.0],
         "i2t_r1": [0.1], "t2i_r1": [0.1]}), "digits_mst: latest finished run of each method")
    assert run in matrix.axes[0].get_title() and run in curves.axes[0].get_title()
    assert "digits_mst" in comparison.axes[0].get_title()
    ticks = [label.get_text() for label in matrix.axes[0].get_xticklabels()]
    assert ticks[0] == "task_1\n(zero, one)"
    assert "classified among all" in matrix.axes[0].get_xlabel().replace("\n", " ")
    # Fractions everywhere, as in the tables, JSON and MLflow: no axis runs to 100.
    assert matrix.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert curves.axes[0].get_ylim() == (0.0, 1.0) and comparison.axes[0].get_xlim() == (0.0, 1.0)
    assert all("%" not in axes.get_ylabel() for figure in (matrix, curves, comparison) for axes in figure.axes)
