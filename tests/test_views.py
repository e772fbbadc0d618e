"""The views a researcher reads without our help: ``benchmarks/look_at_views.py`` opens the MLflow
UI and kedro-viz of a finished project in headless Chromium and checks what the README promises.

Needs playwright and a Chromium (not dependencies of the project: the ``views`` extra); without
them the test is skipped, before any project is built, saying what is missing."""

from __future__ import annotations

import shutil

import pytest
import yaml

from project_helpers import REPO_ROOT, benchmark_script


LOOK = benchmark_script("look_at_views")
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

