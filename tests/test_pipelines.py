"""The Kedro pipelines end to end on tiny settings, in temporary projects."""

from __future__ import annotations

import inspect
import json
import shutil

import pandas as pd
import pytest
import torch

from project_helpers import (
    BENCHMARK, TASKS, copy_project, file_state, mlflow_runs,
    run_folders, run_pipeline, store_uri,
)

METRIC_COLUMNS = ["step", "task", "ut_acc", "zs_acc", "a_acc", "bwt", "learning_acc", "learning_acc_own", "seen_acc",
                  "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def project(finished, tmp_path):
    """A copy of the finished project that a test may change."""
    return copy_project(finished, tmp_path / "project")


def _state_dict_equal(first, second) -> bool:
    a, b = first.model.state_dict(), second.model.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load_checkpoint(path):
    from clip_continual.io import CheckpointDataset

    return CheckpointDataset(filepath=str(path)).load()


# --- the default pipeline ---------------------------------------------------------------------

def test_default_pipeline_writes_reports(finished):
    reporting = finished / "data" / "08_reporting"
    table = pd.read_csv(reporting / "continual_metrics.csv")
    assert list(table.columns) == METRIC_COLUMNS
    assert table["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert table["task"].tolist() == ["pretrained", *TASKS]
    accuracies = table[["ut_acc", "zs_acc", "a_acc"]].to_numpy()
    assert ((accuracies >= 0) & (accuracies <= 1)).all()

    matrix = pd.read_csv(reporting / "accuracy_matrix.csv")
    assert list(matrix.columns) == ["after", *TASKS]
    assert matrix["after"].tolist() == ["pretrained", *TASKS]

    summary = json.loads((reporting / "continual_summary.json").read_text())
    assert summary["benchmark"] == BENCHMARK and summary["method"] == "vr_lwf"
    assert summary["num_tasks"] == len(TASKS)
    assert summary["ut_acc"] == pytest.approx(table["ut_acc"].iloc[-1])

    for plot in ("accuracy_matrix.png", "metric_curves.png"):
        content = (reporting / plot).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 1000, plot

    pretraining = json.loads((reporting / "pretraining_metrics.json").read_text())
    for key in ("zs_acc", "i2t_r1", "t2i_r1"):
        assert 0.0 <= pretraining[key] <= 1.0, key


def test_default_pipeline_writes_one_checkpoint_per_task(finished):
    (folder,) = run_folders(finished)
    assert folder.name.startswith("vr_lwf-")
    assert sorted(p.name for p in folder.glob("*.pt")) == [f"{task}.pt" for task in TASKS]
    (outputs,) = run_folders(finished, "07_model_output")
    assert outputs.name == folder.name
    for step in ("pretrained", *TASKS):
        evaluation = json.loads((outputs / f"{step}_evaluation.json").read_text())
        assert evaluation["task"] == step
    # the run's own copy of its metrics table
    assert pd.read_csv(outputs / "continual_metrics.csv")["step"].tolist() == [0, 1, 2, 3, 4, 5]

    model = _load_checkpoint(folder / "task_5.pt")
    assert model.metadata["method"] == "vr_lwf" and model.metadata["task_index"] == 5
    assert model.metadata["classes"] == [8, 9]
    start = _pretrained_checkpoint(finished).parent
    assert start.name.startswith("clip-continual-micro-")


def _pretrained_checkpoint(project):
    """The start model's checkpoint, in its source-key folder."""
    (checkpoint,) = (project / "data" / "06_models" / "pretrained").glob("*/model.pt")
    return checkpoint


def test_catalog_resolves_run_artifacts_into_the_run_key_folder(finished):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from clip_continual.io import CheckpointDataset

    bootstrap_project(finished)
    with KedroSession.create(project_path=finished) as session:
        catalog = session.load_context().catalog
    (folder,) = run_folders(finished)
    model = catalog.get(f"{BENCHMARK}.task_3.model")
    assert isinstance(model, CheckpointDataset)
    assert model._describe()["filepath"] == (folder / "task_3.pt").as_posix()
    assert catalog.exists(f"{BENCHMARK}.task_3.evaluation")
    assert catalog.load("continual_metrics")["step"].tolist() == [0, 1, 2, 3, 4, 5]


def test_run_key_paths_resolve_without_hooks_as_in_kedro_viz(finished, monkeypatch):
    """`kedro viz run` builds the catalog without running hooks: the keys come from the
    project's configured parameters, so its paths and previews are the run's real files."""
    from clip_continual.runtime import run_key

    monkeypatch.setattr(run_key, "_current", None)
    monkeypatch.setattr(run_key, "_current_source", None)
    monkeypatch.chdir(finished / "data")  # a subfolder of the project, too
    (folder,) = run_folders(finished)
    assert run_key.current_run_key() == folder.name
    assert _pretrained_checkpoint(finished).parent.name == run_key.current_source_key()
    monkeypatch.chdir(finished.parent)  # outside any project: the placeholder key
    assert run_key.current_run_key() == run_key.DEFAULT_RUN_KEY


LAYERS = ("03_primary", "05_model_input", "06_models", "08_reporting")


def test_every_stored_dataset_has_a_layer_and_layers_flow_one_way(finished):
    """kedro viz draws the layers in order only when no node (nor namespace, its nodes together)
    reads a later layer than it writes."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.io import MemoryDataset

    from clip_continual.pipeline_registry import register_pipelines

    bootstrap_project(finished)
    with KedroSession.create(project_path=finished) as session:
        catalog = session.load_context().catalog
    pipeline = register_pipelines()["__default__"]

    def rank(name):
        dataset = catalog.get(name)
        if name.startswith("params:") or isinstance(dataset, MemoryDataset):
            return None
        layer = (dataset.metadata or {}).get("kedro-viz", {}).get("layer")
        assert layer in LAYERS, name
        return LAYERS.index(layer)

    parts = [pipeline.only_nodes(node.name) for node in pipeline.nodes]
    parts += [pipeline.only_nodes_with_namespaces([space]) for space in {n.namespace for n in pipeline.nodes if n.namespace}]
    for part in parts:
        read = [r for r in map(rank, part.inputs()) if r is not None]
        written = [r for r in map(rank, part.all_outputs()) if r is not None]
        if read and written:
            assert max(read) <= min(written), part.describe()


# --- reuse, resume and separate runs ------------------------------------------------------------

def test_second_run_reuses_the_pretrained_checkpoint(project, monkeypatch):
    from clip_continual.pipelines.pretraining import nodes as pretraining_nodes

    checkpoint = _pretrained_checkpoint(project)
    before, written = _load_checkpoint(checkpoint), file_state(checkpoint)
    calls = []
    real_pretrain = pretraining_nodes.pretrain

    def counting_pretrain(*args, **kwargs):
        calls.append(1)
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(pretraining_nodes, "pretrain", counting_pretrain)
    run_pipeline(project, ["data_preparation", "pretraining"])
    assert calls == [], "the same settings must reuse the pretrained checkpoint"
    assert file_state(checkpoint) == written, "an unchanged checkpoint is not written again"
    after = _load_checkpoint(checkpoint)
    assert _state_dict_equal(before, after)
    assert after.metadata["source"] == before.metadata["source"]

    # Other pretraining settings do pretrain again, into a folder of their own.
    run_pipeline(project, ["pretraining"], params={"pretraining": {"steps": 4}})
    assert calls == [1]
    assert len(list((project / "data" / "06_models" / "pretrained").glob("*/model.pt"))) == 2
    assert file_state(checkpoint) == written


def test_only_missing_outputs_resumes_an_interrupted_sequence(project):
    (models,) = run_folders(project)
    (outputs,) = run_folders(project, "07_model_output")
    done, interrupted = TASKS[:3], TASKS[3:]
    # As if the run had stopped after task_3: no later checkpoints, evaluations nor report.
    for task in interrupted:
        (models / f"{task}.pt").unlink()
        (outputs / f"{task}_evaluation.json").unlink()
        (outputs / f"{task}_training.json").unlink()
    (outputs / "continual_metrics.csv").unlink()
    kept = {task: file_state(models / f"{task}.pt") for task in done}
    kept_evaluations = {task: file_state(outputs / f"{task}_evaluation.json") for task in done}

    run_pipeline(project, [BENCHMARK], only_missing_outputs=True)

    assert {task: file_state(models / f"{task}.pt") for task in done} == kept
    assert {task: file_state(outputs / f"{task}_evaluation.json") for task in done} == kept_evaluations
    for task in interrupted:
        assert (models / f"{task}.pt").is_file() and (outputs / f"{task}_evaluation.json").is_file()
    table = pd.read_csv(outputs / "continual_metrics.csv")
    assert table["step"].tolist() == [0, 1, 2, 3, 4, 5]
    # The resumed run evaluated steps 4 and 5 only (the earlier evaluation files are untouched),
    # and its MLflow run still holds the whole sequence, from the stored evaluations.
    from mlflow.tracking import MlflowClient

    (run,) = mlflow_runs(store_uri(project))
    history = MlflowClient(tracking_uri=store_uri(project)).get_metric_history(run.info.run_id, "continual/ut_acc")
    assert sorted(point.step for point in history) == [0, 1, 2, 3, 4, 5]
    assert run.info.status == "FINISHED"


def test_a_second_method_neither_collides_nor_resumes_the_first(compared):
    project = compared.path
    folders = {folder.name: folder for folder in run_folders(project)}
    assert len(folders) == 2 and compared.vr_lwf_folder in folders
    (ft_name,) = set(folders) - {compared.vr_lwf_folder}
    assert ft_name.startswith("ft-")

    vr_lwf = folders[compared.vr_lwf_folder]
    assert {task: file_state(vr_lwf / f"{task}.pt") for task in TASKS} == compared.vr_lwf_checkpoints
    # With only_missing_outputs the ft run trained every task of its own.
    for task in TASKS:
        assert _load_checkpoint(folders[ft_name] / f"{task}.pt").metadata["method"] == "ft"
    outputs = project / "data" / "07_model_output" / BENCHMARK
    assert (outputs / ft_name / "continual_metrics.csv").is_file()
    # ... and its reports replaced the vr_lwf run's as the latest.
    summary = json.loads((project / "data" / "08_reporting" / "continual_summary.json").read_text())
    assert summary["method"] == "ft"


# --- registry and the other pipelines -----------------------------------------------------------

def test_registry_lists_every_pipeline():
    from clip_continual.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    assert {"data_preparation", "pretraining", "vocabulary_replay", "continual_learning", "evaluation",
            "compare", "digits_mst", "digits_ost", "__default__"} <= set(pipelines)

    chain = pipelines[BENCHMARK]
    namespaces = {node.namespace for node in chain.nodes if node.namespace}
    assert {f"{BENCHMARK}.{task}" for task in TASKS} | {f"{BENCHMARK}.pretrained"} == namespaces
    previous = "pretrained_model"
    for task in TASKS:
        (fine_tune,) = [n for n in chain.nodes if n.name == f"{BENCHMARK}.{task}.fine_tune_{task}"]
        assert previous in fine_tune.inputs
        assert f"{BENCHMARK}.{task}.model" in fine_tune.outputs
        previous = f"{BENCHMARK}.{task}.model"

    default = pipelines["__default__"]
    for part in ("data_preparation", "pretraining", "vocabulary_replay", BENCHMARK):
        assert set(pipelines[part].nodes) <= set(default.nodes), part
    assert len(pipelines["digits_ost"].only_nodes_with_tags("training").nodes) == 1
    # A benchmark alone builds its run's vocabulary (another method needs its own).
    for benchmark in ("digits_mst", "digits_ost"):
        assert "build_replay_vocabulary" in {node.name for node in pipelines[benchmark].nodes}


def test_every_default_node_shows_its_source_and_own_name_in_kedro_viz():
    """kedro viz reads the code of plain functions only (following ``__wrapped__``), and names
    a node inside its namespace by its own name: five `fine_tune` boxes would look the same."""
    from kedro_viz.models.flowchart.model_utils import _extract_wrapped_func

    from clip_continual.pipeline_registry import register_pipelines

    nodes = register_pipelines()["__default__"].nodes
    for node in nodes:
        assert inspect.isfunction(node.func), node.name
        source = inspect.getsource(_extract_wrapped_func(node.func))
        assert source.lstrip().startswith("def "), node.name
        assert "bound(" not in source, node.name
        assert inspect.getfile(node.func) == inspect.getfile(_extract_wrapped_func(node.func)), node.name
    own_names = [node.name.rsplit(".", 1)[-1] for node in nodes]
    assert len(set(own_names)) == len(own_names)


def test_bind_fixes_arguments_and_rejects_unknown_ones():
    from clip_continual.pipelines import bind

    def scale(value, *, factor):
        return value * factor

    double = bind(scale, factor=2)
    assert double(4) == 8 and double.__name__ == "scale"
    assert list(inspect.signature(double).parameters) == ["value"]
    with pytest.raises(TypeError, match="factor2"):
        bind(scale, factor2=2)


def test_a_benchmark_pipeline_runs_on_its_own(project):
    """`kedro run --pipelines digits_ost` after the prerequisites: one task."""
    run_pipeline(project, ["digits_ost"])
    (folder,) = run_folders(project, benchmark="digits_ost")
    assert sorted(p.name for p in folder.glob("*.pt")) == ["task_1.pt"]
    table = pd.read_csv(project / "data" / "08_reporting" / "continual_metrics.csv")
    assert table["step"].tolist() == [0, 1]
    summary = json.loads((project / "data" / "08_reporting" / "continual_summary.json").read_text())
    assert summary["benchmark"] == "digits_ost" and summary["num_tasks"] == 1


def test_a_benchmark_defined_in_code_is_a_pipeline_of_its_own(project, monkeypatch):
    """A two-session benchmark added to the registry runs as `kedro run --pipelines <name>`."""
    from clip_continual.runtime.benchmarks import BENCHMARKS, Benchmark, class_tasks

    monkeypatch.setitem(BENCHMARKS, "digits_two", Benchmark(
        name="digits_two", tasks=class_tasks("digits_train", ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))),
        suite=BENCHMARKS["digits_mst"].suite, default_teacher="previous",
        description="digits in two sessions of five classes",
    ))
    run_pipeline(project, ["digits_two"])
    (folder,) = run_folders(project, benchmark="digits_two")
    assert sorted(p.name for p in folder.glob("*.pt")) == ["task_1.pt", "task_2.pt"]
    matrix = pd.read_csv(project / "data" / "08_reporting" / "accuracy_matrix.csv")
    assert list(matrix.columns) == ["after", "task_1", "task_2"]
    assert matrix["after"].tolist() == ["pretrained", "task_1", "task_2"]
    (run,) = mlflow_runs(store_uri(project))
    assert run.info.run_name == "vr_lwf alpha=1 seed=0 on digits_two"


# --- clear errors -----------------------------------------------------------------------------

def test_unknown_method_fails_at_once_naming_the_known_methods(project):
    from clip_continual.methods import METHODS

    with pytest.raises(ValueError, match="unknown method 'bogus'") as error:
        run_pipeline(project, params={"method": "bogus"})
    for name in METHODS:
        assert name in str(error.value)
    # Checked before any node ran: nothing written for the bogus run, no MLflow run opened.
    assert not any(folder.name.startswith("bogus-") for folder in run_folders(project, "07_model_output"))
    assert mlflow_runs(store_uri(project)) == []


def test_invalid_training_parameter_fails_with_a_clear_message(project):
    with pytest.raises(ValueError, match="lr must be a positive, finite number, got -1"):
        run_pipeline(project, [BENCHMARK], params={"continual_learning": {"training": {"lr": -1}}})


def test_unknown_pipeline_fails_with_a_clear_message(project):
    with pytest.raises(ValueError, match="Failed to find the pipeline named 'digits_mts'"):
        run_pipeline(project, ["digits_mts"])


def test_missing_input_names_the_pipeline_that_writes_it(project):
    shutil.rmtree(project / "data" / "03_primary")
    with pytest.raises(Exception, match="data_preparation"):
        run_pipeline(project, [BENCHMARK])
