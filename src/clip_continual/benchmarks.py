"""Benchmarks: which updated task, split into which phases, taught by which teacher.

A benchmark's task count is part of its definition, known when pipelines are registered:
Kedro cannot reshape a pipeline from runtime parameters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    updated_task: str  # prefix of the prepared `<updated_task>_train` / `_test` datasets
    phases: tuple[tuple[int, ...], ...]  # class ids trained in each task, in order
    default_teacher: str  # "previous" (MST) or "pretrained" (OST)
    description: str

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(f"task_{k}" for k in range(1, len(self.phases) + 1))

    @property
    def protocol(self) -> str:
        return "ost" if len(self.phases) == 1 else "mst"


BENCHMARKS = {
    "digits_mst": Benchmark(
        name="digits_mst",
        updated_task="digits",
        phases=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
        default_teacher="previous",
        description="handwritten digits, 5 sessions of 2 classes (multi-session training)",
    ),
    "digits_ost": Benchmark(
        name="digits_ost",
        updated_task="digits",
        phases=(tuple(range(10)),),
        default_teacher="pretrained",
        description="handwritten digits, all 10 classes at once (one-session training)",
    ),
}
DEFAULT_BENCHMARK = "digits_mst"
