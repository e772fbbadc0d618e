"""The views a researcher reads without our help: ``benchmarks/look_at_views.py`` opens the MLflow
UI and kedro-viz of a finished project in headless Chromium and checks what the README promises.

Needs playwright and a Chromium (not dependencies of the project: the ``views`` extra); without
them the test is skipped, before any project is built, saying what is missing."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import yaml

from project_helpers import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("look_at_views", REPO_ROOT / "benchmarks" / "look_at_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOK = _script()
MISSING = LOOK.why_not_runnable()


@pytest.mark.skipif(MISSING is not None, reason=f"views not looked at: {MISSING}")
def test_the_views_read_well(compared, tmp_path):
    """Two runs (vr_lwf, then ft) and compare, in a copy (kedro-viz may write beside the project);
    screenshots under the test's temporary folder."""
    project = tmp_path / "project"
    shutil.copytree(compared.path, project)
    assert LOOK.look(project, tmp_path / "views") == []


DATA_FLOW = ["03_primary", "05_model_input", "06_models", "08_reporting"]


def test_kedro_viz_layers_sort_in_data_flow_order():
    """kedro-viz orders the layers that no edge orders by name (``digits_ost`` reads primary data
    and the pretrained model side by side): numbered, their names sort as the data flows."""
    catalog = yaml.safe_load((REPO_ROOT / "conf" / "base" / "catalog.yml").read_text())
    layers = {entry["metadata"]["kedro-viz"]["layer"] for entry in catalog.values()
              if isinstance(entry, dict) and "kedro-viz" in entry.get("metadata", {})}
    assert sorted(layers) == DATA_FLOW


def test_the_workflow_view_opens_on_the_pipeline_that_ran(tmp_path):
    """kedro-viz marks every node of the pipeline it opens that the last run did not run as
    "Skipped": the script opens the workflow on the benchmark the run's nodes belong to."""
    import json

    (tmp_path / ".viz").mkdir()
    events = tmp_path / ".viz" / "kedro_pipeline_events.json"
    ran = [{"event": "before_pipeline_run"}, {"event": "after_node_run", "node": "build_replay_vocabulary"},
           {"event": "after_node_run", "node": "coco_mst.task_1.fine_tune_task_1"}]
    events.write_text(json.dumps(ran))
    assert LOOK._last_run_pipeline(tmp_path) == "coco_mst"
    events.write_text(json.dumps(ran[:2]))
    assert LOOK._last_run_pipeline(tmp_path) == "__default__"
