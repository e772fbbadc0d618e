"""benchmarks/task_routing.py: reads a finished run's checkpoints session by session; the
columns it prints are the numbers the README quotes on why DIKI, DPW and ConDU learn what they do."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from project_helpers import benchmark_script, copy_project, run_pipeline


@pytest.fixture(scope="module")
def routing():
    return benchmark_script("task_routing")


@pytest.mark.parametrize("method", ["diki", "condu"])
def test_each_session_is_read_six_ways(routing, finished, tmp_path, method, capsys, monkeypatch):
    project = copy_project(finished, tmp_path / "project")
    # Six test digits of each class, in the prepared file's own format: DIKI routes each test image
    # alone here, and the 540 digits of the full split would cost seconds per evaluation.
    test_file = project / "data" / "03_primary" / "digits_test.npz"
    arrays = dict(np.load(test_file))
    keep = np.sort(np.concatenate([np.flatnonzero(arrays["labels"] == label)[:6] for label in range(10)]))
    np.savez(test_file, images=arrays["images"][keep], labels=arrays["labels"][keep],
             class_names=arrays["class_names"])
    run_pipeline(project, ["digits_mst"], params={"method": method})
    monkeypatch.setattr(sys, "argv", ["task_routing.py", str(project), method])
    routing.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "(" in line]
    assert len(rows) == len(routing.PHASES)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        numbers = {name: float(cell) for name, cell in zip(routing.COLUMNS, cells) if cell != "–"}
        assert set(numbers) >= {"as evaluated", "batch vote", "session alone", "start model", "routed right"}
        assert all(0.0 <= value <= 1.0 for value in numbers.values())
        assert ("task given" in numbers) == (method == "condu")
    # The first session is the only task: every image is routed to it, whatever the rule.
    first = dict(zip(routing.COLUMNS, [c.strip() for c in rows[0].strip("|").split("|")][1:]))
    assert float(first["routed right"]) == 1.0
    assert first["as evaluated"] == first["batch vote"] == first["session alone"]


def test_a_method_that_never_ran_there_is_named(routing, finished, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["task_routing.py", str(finished), "dpw"])
    with pytest.raises(SystemExit, match="no 'dpw' run under"):
        routing.main()
