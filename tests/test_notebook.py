"""notebooks/explore_run.ipynb runs top to bottom against a finished tiny run."""

from __future__ import annotations

import sys

import nbformat
import pytest
from nbclient import NotebookClient

from project_helpers import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "explore_run.ipynb"


@pytest.fixture
def kernel_of_this_interpreter(tmp_path, monkeypatch):
    """A `python3` kernel spec that starts this very interpreter (found first on JUPYTER_PATH)."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3",
                      overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                          "{connection_file}"]})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def _texts(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        for mime in ("text/plain", "text/html", "text/markdown"):
            parts.append(output.get("data", {}).get(mime, ""))
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_against_a_finished_run(compared, kernel_of_this_interpreter, monkeypatch, tmp_path):
    # Started outside any project: the project comes from the environment variable alone.
    monkeypatch.setenv("CLIP_CONTINUAL_PROJECT", str(compared.path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=kernel_of_this_interpreter, timeout=180,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert str(compared.path) in _texts(code[0])

    (table,) = [cell for cell in code if 'catalog.load("continual_metrics")' in cell.source]
    html = _texts(table)
    assert "<table" in html
    for column in ("step", "ut_acc", "zs_acc", "a_acc", "bwt", "i2t_r1"):
        assert column in html

    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # accuracy matrix, metric curves, comparison

    (comparison,) = [cell for cell in code if 'catalog.exists("method_comparison")' in cell.source]
    text = _texts(comparison)
    assert "vr_lwf" in text and "ft" in text and "No method comparison" not in text
