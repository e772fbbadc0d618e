"""What each method costs on the embedded default, beside its accuracy: every method run once
(seed 0) by the sweep into a tracking store of its own, then one Markdown row per method from
the runs' ``cost/`` metrics, summed up as ``kedro run --pipelines compare`` sums them up
(``runtime/results.py``).

    python benchmarks/method_costs.py                          # every method
    python benchmarks/method_costs.py --methods ft vr_lwf icarl

The project's prepared data and pretrained model are reused when they are on disk (the first
run otherwise prepares and pretrains, a cost that run alone logs as ``cost/pretraining_s``).
Wall times, device-hours and the peak memory depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

EXPERIMENT = "clip-continual"
BENCHMARK = "digits_mst"
# (column, the compare column it shows, format)
COLUMNS = (
    ("A-Acc", "a_acc", "{:.3f}"),
    ("params trained", "trainable_parameters", "{:,.0f}"),
    ("params stored", "stored_parameters", "{:,.0f}"),
    ("extra storage MiB", "extra_storage_mib", "{:.2f}"),
    ("peak memory MiB", "peak_memory_mib", "{:.0f}"),
    ("s / task", "wall_time_per_task_s", "{:.1f}"),
    ("device-hours", "device_hours", "{:.4f}"),
    ("images seen", "images_seen", "{:,.0f}"),
    ("fwd / step", "forward_passes_per_step", "{:g}"),
    ("teacher fwd / step", "teacher_forward_passes_per_step", "{:g}"),
    ("bwd / step", "backward_passes_per_step", "{:g}"),
)


def run_methods(methods: list[str], seed: int, project: Path, uri: str, params: str | None) -> None:
    """One sweep over ``methods`` at ``seed``, logging to ``uri``."""
    command = [sys.executable, "-m", "clip_continual.sweep", "--methods", *methods, "--seeds", str(seed),
               "--project-path", str(project), *(["--params", params] if params else [])]
    # The runs' log to stderr: stdout holds the table alone.
    subprocess.run(command, cwd=project, check=True, stdout=sys.stderr,
                   env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def _cell(value: Any, form: str) -> str:
    return "" if value is None or value != value else form.format(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["method", *(title for title, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['method']}`", *(_cell(row.get(key), form) for _, key, form in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from clip_continual.methods import METHODS
    from clip_continual.runtime.results import latest_finished_runs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--project-path", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--store", default=None,
                        help="MLflow tracking URI to log to (default: a new SQLite file in a temporary folder)")
    parser.add_argument("--params", default=None, help="overrides for every run, as in kedro run --params")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        uri = args.store or f"sqlite:///{Path(folder) / 'mlflow.db'}"
        run_methods(args.methods, args.seed, args.project_path.resolve(), uri, args.params)
        rows = latest_finished_runs(uri, EXPERIMENT, BENCHMARK)
    print(markdown_table(sorted(rows, key=lambda row: args.methods.index(row["method"].split(" ")[0]))))


if __name__ == "__main__":
    main()
