"""Evaluation protocols on a sequence of datasets: what the model is told about the task of its
test images, and which classes each test image is classified among.

``task_identity``
  - ``given``: while dataset i's test images are encoded, the model may read i
    (``model.adapters.evaluated_task(model).images``), as ZSCL's MTIL knows the dataset of
    every test set.
  - ``hidden``: it reads None (task-agnostic MTIL, X-TAIL, ODCL-CIL). A method whose inference
    rule needs the task (``task_identity = "required"``) is refused before any work.

``label_space``
  - ``own``: each dataset's test images among its own classes (ZSCL's MTIL; DIKI's and ConDU's
    task-agnostic MTIL keep it).
  - ``learned_tasks``: a learnt dataset's test images among the classes of every dataset learnt
    so far, an unlearnt one's among its own (DPW's ODCL-CIL, ``DPW/DPW.py`` ``CustomCLIP.forward``
    with ``is_CIL`` and ``evaluate``: logits concatenated over the learnt tasks, targets offset by
    ``class_ids[task_id]``).
  - ``all_tasks``: every test image among the union of ALL datasets' classes, learnt or not
    (RAIL's X-TAIL, ``primal_RAIL.py``: ``merged_classnames`` built before training, targets
    offset by ``tested_cls_num``).

Pooled classes follow the task order: dataset i's classes are rows ``offsets[i]`` to
``offsets[i + 1] - 1`` (offsets are the cumulative class counts). Whatever the label space, R[t][i]
is the top-1 accuracy on dataset i after step t, so Transfer / Avg / Last are ZSCL's
(``evaluation.metrics``) on every protocol.

Test batches hold one dataset's images under every protocol, as upstream evaluates them: a
method that votes over a batch (MoE-Adapters' DDAS chunks, DIKI's and DPW's batch-wise prompt)
still sees a batch of one domain; DPW evaluates ODCL-CIL's learnt tasks one image at a time
(``get_dataloader``, ``CIL_flag``) for that reason. A phase evaluation (the embedded digits,
class-incremental CIFAR-100) has one test set over every phase's classes, whose batches mix the
tasks: it says so (``EvaluatedTask.mixed_batches``), and a batch-wise rule decides per image.

Plain Python; no Kedro import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TASK_IDENTITIES = ("given", "hidden")
LABEL_SPACES = ("own", "learned_tasks", "all_tasks")
METHOD_TASK_IDENTITIES = ("unused", "optional", "required")


class ProtocolError(ValueError):
    """An evaluation protocol is unknown, or the method cannot be evaluated under it."""


@dataclass(frozen=True)
class EvaluationProtocol:
    task_identity: str = "given"
    label_space: str = "own"

    def __post_init__(self) -> None:
        if self.task_identity not in TASK_IDENTITIES:
            raise ProtocolError(f"evaluation.task_identity must be one of {', '.join(TASK_IDENTITIES)}, "
                                f"got {self.task_identity!r}")
        if self.label_space not in LABEL_SPACES:
            raise ProtocolError(f"evaluation.label_space must be one of {', '.join(LABEL_SPACES)}, "
                                f"got {self.label_space!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> EvaluationProtocol:
        """The protocol of a benchmark's ``evaluation`` block (absent keys: ZSCL's MTIL)."""
        params = params or {}
        return cls(str(params.get("task_identity") or "given"), str(params.get("label_space") or "own"))

    @property
    def hides_task(self) -> bool:
        return self.task_identity == "hidden"

    def image_task(self, dataset: int) -> int | None:
        """What the model may read as the task of dataset ``dataset``'s test images."""
        return None if self.hides_task else dataset

    def check_evaluation(self, benchmark: str, evaluation: str) -> None:
        """Pooled label spaces exist only where each task is a dataset of its own."""
        if self.label_space != "own" and evaluation != "datasets":
            raise ProtocolError(f"evaluation.label_space {self.label_space!r} pools the classes of a sequence "
                                f"of datasets; '{benchmark}' is evaluated by '{evaluation}': use label_space: own")

    def check_method(self, method: str, declared: str, evaluation: str = "datasets",
                     label_spaces: Sequence[str] = LABEL_SPACES) -> None:
        """Refuse a method that needs the task of its test images where none reaches it: under
        ``hidden``, or on an evaluation that never tells it (``phases``, ``class_incremental``);
        and one whose inference rule defines no classification among ``label_space``'s classes
        (``label_spaces``: those it defines)."""
        if self.label_space not in label_spaces:
            raise ProtocolError(
                f"method '{method}' defines no inference among the classes of evaluation.label_space: "
                f"{self.label_space} (it defines {', '.join(label_spaces)}); evaluate it under one of "
                "those, or choose a method that does")
        if declared not in METHOD_TASK_IDENTITIES:
            raise ProtocolError(f"method '{method}' declares task_identity {declared!r}; use one of "
                                f"{', '.join(METHOD_TASK_IDENTITIES)}")
        if declared != "required":
            return
        if self.hides_task:
            raise ProtocolError(
                f"method '{method}' picks its inference path by the task of each test image, which "
                "evaluation.task_identity: hidden withholds; evaluate it with task_identity: given, or "
                "choose a method that runs without the task id")
        if evaluation != "datasets":
            raise ProtocolError(
                f"method '{method}' needs the task of each test image, which a '{evaluation}' evaluation "
                "never gives (only a sequence of datasets, e.g. mtil_order1, does)")


def class_offsets(class_counts: Sequence[int]) -> np.ndarray:
    """(T + 1,) where each dataset's classes start in the pooled label space, then the total."""
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 1).any():
        raise ProtocolError(f"every dataset needs at least one class, got class counts {list(class_counts)}")
    return np.concatenate([[0], np.cumsum(counts)])


def candidate_datasets(label_space: str, step: int, dataset: int, count: int) -> tuple[int, ...]:
    """The datasets (0-based, in task order) whose classes dataset ``dataset``'s test images are
    classified among after ``step`` (0 = the starting model; datasets 0..step-1 are learnt), of
    ``count`` datasets in all."""
    if label_space == "all_tasks":
        return tuple(range(count))
    if label_space == "learned_tasks" and dataset < step:
        return tuple(range(step))
    if label_space in ("own", "learned_tasks"):
        return (dataset,)
    raise ProtocolError(f"unknown label space {label_space!r}; use one of {', '.join(LABEL_SPACES)}")
