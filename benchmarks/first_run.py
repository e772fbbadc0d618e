"""The README's first `kedro run`, timed as a user meets it: a fresh clone of this repository's
committed HEAD (no data, no pretrained checkpoint, no MLflow store), then `kedro run` in it.

    python benchmarks/first_run.py              # one run
    python benchmarks/first_run.py --repeat 3   # three fresh clones, one after the other

Prints per run the wall and CPU seconds of the whole command, and from the run's own reports how
long pretraining took (``pretraining_metrics.json``), then the median over the runs. Run it on an
idle machine: another process on the same cores changes every figure. The package must be
installed (``pip install -e .``); the clone's own ``src`` is what Kedro imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(folder: Path) -> dict[str, float]:
    subprocess.run(["git", "clone", "--quiet", str(PROJECT), str(folder)], check=True)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    log = folder / "first_run.log"
    cpu, started = children_cpu_seconds(), time.perf_counter()
    with open(log, "w") as output:
        finished = subprocess.run([sys.executable, "-m", "kedro", "run"], cwd=folder, env=env,
                                  stdout=output, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu
    if finished.returncode != 0:
        raise SystemExit(f"`kedro run` failed in {folder} (exit {finished.returncode}); see {log}")
    pretraining = json.loads((folder / "data/08_reporting/pretraining_metrics.json").read_text())
    return {"wall": wall, "cpu": cpu, "pretraining": float(pretraining["train_seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="fresh clones to time, one after the other")
    args = parser.parse_args()
    runs = []
    for index in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="clip-continual-first-run-") as folder:
            run = one_run(Path(folder) / "clip-continual")
        runs.append(run)
        print(f"run {index + 1}: {run['wall']:.1f} s wall ({run['wall'] / 60:.2f} min), {run['cpu']:.1f} s CPU; "
              f"pretraining {run['pretraining']:.1f} s, the rest {run['wall'] - run['pretraining']:.1f} s", flush=True)
    if len(runs) > 1:
        print("median: " + ", ".join(f"{key} {statistics.median(r[key] for r in runs):.1f} s"
                                     for key in ("wall", "cpu", "pretraining")))


if __name__ == "__main__":
    main()
