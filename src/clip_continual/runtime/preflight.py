"""What the check before a run's first node adds to the single checks: every problem found
gathered into one message (an offline ``mtil_order1`` without data names the weights and all
eleven datasets at once, not one per try), and the disk space for all the run writes (its
checkpoints, start model, prepared data, reports and their MLflow copies), summed per disk.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_continual.files import FORMAT_OVERHEAD, _megabytes
from clip_continual.runtime.run_key import SOURCE_KEY_PARAMETERS

GIB = 1024 ** 3
REPORT_BYTES = 1024 ** 2  # a report (CSV, JSON, a plot's PNG) stays well under a MiB
MODEL_BYTES: dict[str, int] = {}  # architecture -> bytes of its weights (computed once)


@dataclass(frozen=True)
class Write:
    """A file (or folder) the run will write, its estimated size, and what it is, as the disk
    check names it ("checkpoints", "prepared data", ...)."""

    what: str
    path: Path
    size: int


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
    """The nearest existing folder of ``path`` (what will hold it)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def _mount_of(path: Path) -> Path:
    """The top folder of ``path``'s filesystem, as messages name the disk."""
    device = _device(path)
    while path != path.parent and _device(path.parent) == device:
        path = path.parent
    return path


def _amount(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB // 10 else _megabytes(size)


def check_disk_space(writes: Iterable[Write]) -> None:
    """What the run writes fits on each disk: the estimates of every file on one filesystem
    summed (checkpoints and prepared data on one disk compete for its space)."""
    disks: dict[int, tuple[Path, dict[str, int]]] = {}
    for write in writes:
        where = _disk_of(write.path)
        mount, sizes = disks.setdefault(_device(where), (_mount_of(where), {}))
        sizes[write.what] = sizes.get(write.what, 0) + write.size + FORMAT_OVERHEAD
    short = []
    for mount, sizes in disks.values():
        needed, free = sum(sizes.values()), shutil.disk_usage(mount).free
        if free < needed:
            parts = ", ".join(f"{what} {_amount(size)}" for what, size in sizes.items())
            short.append(f"needs about {_amount(needed)} on '{mount}' ({parts}), {_amount(free)} free")
    if short:
        raise OSError(f"not enough disk space for the run: {'; '.join(short)}. Free some space, or make the "
                      f"largest folder (data/06_models, data/04_feature) a link to a larger disk, and rerun")


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


def _reads(key: str, read: str) -> bool:
    return key == read or key.startswith(read + ".") or read.startswith(key + ".")


def check_overrides_read(overrides: Mapping[str, Any] | None, read: Iterable[str], pipelines: str) -> None:
    """Every ``--params`` key reaches the pipelines run. ``read`` are the parameters they read
    (dotted): their nodes' ``params:`` inputs, the start model's settings where they load it,
    the hooks'. A key of a block the run never reads (the embedded default's
    ``continual_learning`` on ``coco_mst``, which reads ``coco_mst.continual_learning``) would
    change nothing, silently."""
    from clip_continual.runtime.recipe import setting_leaves

    read = sorted(set(read))
    keys = [".".join(path) for path, _ in setting_leaves(overrides or {})]
    unread = [key for key in keys if not any(_reads(key, r) for r in read)]
    if not unread:
        return
    fixes = []
    for key in unread:
        head, _, rest = key.partition(".")
        near = [r for r in read if r.endswith("." + head)]
        fixes.append(f"'{key}' (write {near[0]}{'.' + rest if rest else ''}=...)" if near else f"'{key}'")
    raise ValueError(
        f"--params {', '.join(fixes)} would change nothing: no node of {pipelines} reads "
        f"{'it' if len(unread) == 1 else 'them'}. The run reads: {', '.join(read)}. Set "
        f"the key under one of those, or run the pipeline that reads it, and rerun")


def check_inputs_present(missing: Mapping[str, Path], pipelines: str, made_by: str | None) -> None:
    """The files the run reads and none of its nodes makes are on disk. ``made_by`` is the
    command whose pipeline makes them all (None: no registered pipeline does). Kedro would load
    each only when its first node starts, after an MLflow run had opened, with a message that
    names the file but not how to get it."""
    if not missing:
        return
    listed = "; ".join(f"{name} ({path})" for name, path in missing.items())
    fix = (f"They are made by `{made_by}`: run it first with the same start-model settings "
           f"({', '.join(SOURCE_KEY_PARAMETERS)}: they name the start model's file), then this command again"
           if made_by else "No pipeline of the project makes them: write them there, or run a pipeline that does")
    raise ValueError(f"{pipelines} reads {len(missing)} file(s) that no node of the run makes and that "
                     f"are not on disk: {listed}. {fix}")
