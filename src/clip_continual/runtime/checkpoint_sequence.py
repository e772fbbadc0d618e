"""The settings of an evaluation of given checkpoints (``evaluate_checkpoints``), checked
before any model work: one checkpoint file per learned task, in the benchmark's task order.

Plain Python; no Kedro import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_continual.model.checkpoint_formats import PICKLE_OPT_IN, ReadOptions
from clip_continual.runtime.benchmarks import Benchmark

SETTINGS = "evaluate_checkpoints"


@dataclass(frozen=True)
class CheckpointSequence:
    """``checkpoints[k-1]`` is the model after task k (row k of the accuracy matrix; row 0 is
    the benchmark's starting model): one per task, as the reports' metrics (BWT, Transfer, Last)
    need every row. ``label`` names the run in the reports."""

    checkpoints: tuple[str, ...]
    label: str
    options: ReadOptions

    @classmethod
    def from_params(cls, params: dict[str, Any], benchmark: Benchmark) -> CheckpointSequence:
        checkpoints = tuple(str(path) for path in params.get("checkpoints") or ())
        if not checkpoints:
            raise ValueError(f"{SETTINGS}.checkpoints is empty: list one checkpoint file per learned task, "
                             f"in task order, e.g. --params '{SETTINGS}.checkpoints=[task_1.pt,task_2.pt]'")
        if len(checkpoints) != len(benchmark.tasks):  # the reports' metrics need every row
            raise ValueError(f"{SETTINGS}.checkpoints lists {len(checkpoints)} files, but {benchmark.name} has "
                             f"{len(benchmark.tasks)} tasks; list one per task (the model after each)")
        missing = [path for path in checkpoints if not Path(path).is_file()]
        if missing:
            raise ValueError(f"{SETTINGS}.checkpoints: no such files {missing}")
        options = ReadOptions(architecture=params.get("architecture"), moe_top_k=int(params.get("moe_top_k", 2)),
                              ddas_threshold=float(params.get("moe_ddas_threshold", 0.0655)),
                              ddas_alexnet_weights=params.get("moe_ddas_alexnet_weights"),
                              allow_pickled=params.get(PICKLE_OPT_IN) is True)
        return cls(checkpoints, str(params.get("label") or "checkpoints"), options)
