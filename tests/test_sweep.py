"""The sweep (several methods over several seeds, one MLflow run each) and `compare` over seeds."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from clip_continual.runtime import sweep
from project_helpers import BENCHMARK, _running_in, copy_project, mlflow_runs, run_pipeline, store_uri

# --- units ------------------------------------------------------------------------------------


def test_params_are_read_as_kedro_run_reads_them():
    assert sweep.parse_params("continual_learning.alpha=0.5,method=lwf") == {
        "continual_learning": {"alpha": 0.5}, "method": "lwf"}
    assert sweep.parse_params("") == {} and sweep.parse_params(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_params("continual_learning.alpha")


def test_a_variant_is_a_method_with_its_own_overrides():
    assert sweep.Variant.parse("ft") == sweep.Variant("ft", {})
    assert sweep.Variant.parse("vr_lwf:continual_learning.alpha=0.5") == sweep.Variant(
        "vr_lwf", {"continual_learning": {"alpha": 0.5}})
    with pytest.raises(ValueError, match="names no method"):
        sweep.Variant.parse(":continual_learning.alpha=0.5")


def test_runs_are_planned_seed_by_seed_and_overrides_merge():
    variants = [sweep.Variant("ft"), sweep.Variant.parse("vr_lwf:continual_learning.alpha=0.5")]
    common = {"continual_learning": {"training": {"steps": 3}, "alpha": 1.0}}
    runs = sweep.planned_runs(variants, [2, 0], common)
    assert [(run["seed"], run["method"]) for run in runs] == [(2, "ft"), (2, "vr_lwf"), (0, "ft"), (0, "vr_lwf")]
    assert runs[0]["continual_learning"] == {"training": {"steps": 3}, "alpha": 1.0}
    assert runs[1]["continual_learning"] == {"training": {"steps": 3}, "alpha": 0.5}
    with pytest.raises(ValueError, match="repeat"):
        sweep.planned_runs(variants, [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        sweep.planned_runs([], [0])


def test_an_unknown_method_fails_before_any_run(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--methods", "ft", "no_such_method", "--seeds", "0"])
    assert "unknown methods ['no_such_method']" in capsys.readouterr().err


def test_the_public_command_is_still_python_m_clip_continual_sweep():
    done = subprocess.run([sys.executable, "-m", "clip_continual.sweep", "--methods", "no_such_method", "--seeds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown methods ['no_such_method']" in done.stderr


# --- a sweep through Kedro sessions -------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(finished, tmp_path_factory):
    """Two methods over seeds 0 and 1 on a copy of the finished project, then `compare`."""
    from clip_continual.pipelines.pretraining import nodes as pretraining_nodes

    project = copy_project(finished, tmp_path_factory.mktemp("swept") / "project")
    pretrained_seeds = []
    real_pretrain = pretraining_nodes.pretrain

    def counting_pretrain(start, corpus, config, *args, **kwargs):
        pretrained_seeds.append(config.seed)
        return real_pretrain(start, corpus, config, *args, **kwargs)

    runs = sweep.planned_runs([sweep.Variant("ft"), sweep.Variant.parse("lwf:continual_learning.training.lr=0.001")],
                              [0, 1])
    with pytest.MonkeyPatch.context() as patch, _running_in(project):
        patch.setattr(pretraining_nodes, "pretrain", counting_pretrain)
        sweep.run_sweep(project, runs)
    run_pipeline(project, ["compare"])
    return project, pretrained_seeds


def test_each_method_and_seed_is_one_finished_run(swept):
    project, _ = swept
    runs = mlflow_runs(store_uri(project))
    assert sorted((run.data.params["method"], run.data.params["seed"]) for run in runs) == [
        ("ft", "0"), ("ft", "1"), ("lwf", "0"), ("lwf", "1")]
    assert all(run.info.status == "FINISHED" for run in runs)
    # The variant's own setting names it, so compare keeps it apart from plain lwf.
    assert {run.data.tags["variant"] for run in runs} == {"ft", "lwf (alpha=1.0, lr=0.001)"}
    assert "lwf alpha=1 lr=0.001 seed=1 on digits_mst" in {run.info.run_name for run in runs}


def test_pretraining_runs_once_per_new_seed(swept):
    _, pretrained_seeds = swept
    # seed 0 reuses the finished project's checkpoint; seed 1 pretrains once for both methods
    assert pretrained_seeds == [1]


def test_compare_reports_mean_and_std_over_seeds(swept):
    project, _ = swept
    reporting = project / "data" / "08_reporting"
    per_run = pd.read_csv(reporting / "method_comparison_runs.csv")
    table = pd.read_csv(reporting / "method_comparison.csv").set_index("method")
    ft = per_run[per_run["method"] == "ft"]
    assert sorted(ft["seed"]) == [0, 1]
    assert table.loc["ft", "seeds"] == 2
    for metric in ("ut_acc", "zs_acc", "mean_learning_acc", "i2t_r1", "wall_time_per_task_s"):
        assert table.loc["ft", metric] == pytest.approx(ft[metric].mean())
        assert table.loc["ft", f"{metric}_std"] == pytest.approx(ft[metric].std(ddof=1))
    assert table.loc["lwf (alpha=1.0, lr=0.001)", "seeds"] == 2
    # What a task costs sits beside the metrics: the whole micro model trains, every task takes time.
    assert (per_run["trainable_parameters"] > 0).all() and (per_run["wall_time_per_task_s"] > 0).all()
    assert table.loc["ft", "trainable_parameters"] == table.loc["lwf (alpha=1.0, lr=0.001)", "trainable_parameters"]
    assert (reporting / "method_comparison.png").read_bytes().startswith(b"\x89PNG")


def test_sweep_runs_only_the_pipeline_asked_for(swept, tmp_path):
    project = copy_project(swept[0], tmp_path / "project")
    with _running_in(project):
        sweep.run_sweep(project, sweep.planned_runs([sweep.Variant("ft")], [0]), pipeline=BENCHMARK)
    (run,) = mlflow_runs(store_uri(project))
    # the continual sequence ran; the pretraining pipeline (whose metrics it would log) did not
    assert "continual/zs_acc" in run.data.metrics
    assert not any(name.startswith("pretraining/") for name in run.data.metrics)


def test_a_variant_is_the_method_and_the_training_settings_its_command_changed():
    from clip_continual.runtime.tracking import variant_label, variant_overrides

    defaults = {"seed": 0, "continual_learning": {
        "alpha": 1.0, "training": {"lr": 1e-4, "steps": 50, "progress": True},
        "methods": {"moe_adapters": {"top_k": 2}, "icarl": {"per_class": 20}}},
        "coco_ost": {"continual_learning": {"training": {"lr": 1e-6}}}}
    command = {"seed": 3, "continual_learning.training.lr": 1e-3,                  # dotted, as --params
               "continual_learning": {"training": {"steps": 50, "progress": False},  # unchanged; display only
                                      "methods": {"moe_adapters": {"top_k": 4}, "icarl": {"per_class": 5}}},
               "coco_ost": {"continual_learning": {"training": {"lr": 1e-5}}}}
    overrides = variant_overrides(command, defaults, "moe_adapters")
    assert overrides == {"lr": 1e-3, "coco_ost.lr": 1e-5, "top_k": 4}
    assert variant_label("moe_adapters", None, {"lr": 0.001, "top_k": 4}) == "moe_adapters (lr=0.001, top_k=4)"
    assert variant_label("vr_lwf", 1.0, {}) == "vr_lwf (alpha=1.0)" and variant_label("ft", None, {}) == "ft"


def test_an_override_the_pipeline_does_not_read_fails_before_the_first_run(finished, tmp_path):
    project = copy_project(finished, tmp_path / "project")
    runs = sweep.planned_runs([sweep.Variant("ft"), sweep.Variant.parse("lwf:coco_mst.continual_learning.alpha=0.5")],
                              [0])
    with _running_in(project), pytest.raises(sweep.SweepError, match=r"sweep run 2/2 .*coco_mst\.continual_learning"):
        sweep.run_sweep(project, runs, pipeline=BENCHMARK)
    assert mlflow_runs(store_uri(project)) == []  # not even the first run started
