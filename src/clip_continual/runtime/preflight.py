"""What the check before a run's first node adds to the single checks: every problem found
gathered into one message (an offline ``mtil_order1`` without data names the weights and all
eleven datasets at once, not one per try), and the disk space the run's checkpoints need.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from clip_continual.files import FORMAT_OVERHEAD, _megabytes

MODEL_BYTES: dict[str, int] = {}  # architecture -> bytes of its weights (computed once)


class PreflightError(RuntimeError):
    """One or more things stop the run before its first node; the message lists them all."""


def gather(checks: Iterable[Callable[[], None]]) -> None:
    """Run every check; raise one ``PreflightError`` listing each problem with its fix."""
    problems = []
    for check in checks:
        try:
            check()
        except (ValueError, RuntimeError, OSError) as error:  # the project's errors name the fix
            problems.append(str(error))
    if len(problems) == 1:
        raise PreflightError(problems[0])
    if problems:
        listed = "\n".join(f"  {n}. {problem}" for n, problem in enumerate(problems, 1))
        raise PreflightError(f"the run cannot start; {len(problems)} problems, fix them all before rerunning:\n{listed}")


def model_bytes(architecture: str) -> int:
    """The bytes of an architecture's weights, from a model built on the meta device (no
    memory, a fraction of a second even for ViT-B-16)."""
    if architecture not in MODEL_BYTES:
        import torch

        from clip_continual.model.clip import create_open_clip_model, register_packaged_configs

        register_packaged_configs()
        with torch.device("meta"):
            model = create_open_clip_model(architecture, None, device="meta")
        MODEL_BYTES[architecture] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return MODEL_BYTES[architecture]


def _disk_of(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(writes: dict[Path, int]) -> None:
    """``writes`` (file -> estimated bytes) fit on their disks, each disk counted once."""
    per_disk: dict[int, tuple[Path, int, int]] = {}
    for path, size in writes.items():
        where = _disk_of(path)
        device = os.stat(where).st_dev
        first, total, count = per_disk.get(device, (where, 0, 0))
        per_disk[device] = (first, total + size + FORMAT_OVERHEAD, count + 1)
    for where, needed, count in per_disk.values():
        free = shutil.disk_usage(where).free
        if free < needed:
            raise OSError(
                f"not enough disk space for the run's checkpoints: {count} files of about "
                f"{_megabytes(needed)} in all under '{where}', which has {_megabytes(free)} free. Free some "
                f"space (or make data/06_models a link to a larger disk) and rerun")


def check_protocol(params: dict, pipeline_names: list[str] | None) -> None:
    """The benchmark's evaluation protocol against the run's method (``evaluation.protocols``):
    a method whose inference rule the protocol withholds or does not define is refused here,
    before its first task trains, not at its first evaluation."""
    from clip_continual.evaluation.protocols import EvaluationProtocol
    from clip_continual.methods import method_class
    from clip_continual.runtime.benchmarks import benchmark_in_force

    benchmark = benchmark_in_force(pipeline_names)
    block = params.get(benchmark.params) if benchmark.params else params
    protocol = EvaluationProtocol.from_params((block or {}).get("evaluation"))
    protocol.check_evaluation(benchmark.name, benchmark.evaluation)
    method = method_class(str(params["method"]))
    protocol.check_method(str(params["method"]), method.task_identity, benchmark.evaluation, method.label_spaces)
