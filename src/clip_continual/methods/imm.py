"""Mean-IMM as the paper's code runs it (CL-CLIP ``methods/imm.py``, ``model_fusion``).

Train with plain cross-entropy (as ft), then merge with the teacher:
``theta = a * theta_new + (1 - a) * theta_teacher`` for every trained parameter; parameters that
were not trained (``parts`` io / to) take the teacher's values, as ``model_fusion`` does. The
teacher is the run's (``continual_learning.teacher``; auto: the previous task's model in MST,
the pretrained model in OST), CL-CLIP's ``self.teacher``.

MST: the merged model is the task's model, so the next task trains on from the interpolation.
OST: CL-CLIP evaluates the merged weights after every epoch and trains on un-merged; a task here
is evaluated once, at its end, so the evaluated model is the merge of the fully trained weights,
exactly what CL-CLIP reports after its last epoch. ``a`` = 0.6 (the paper's 0.6-0.7).
"""

from __future__ import annotations

from torch import nn

from clip_continual.methods.base import MethodConfigError, TaskContext
from clip_continual.methods.ft import FineTuning
from clip_continual.model.weights import interpolate_into


def require_weight(weight: float) -> float:
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise MethodConfigError(f"weight must lie in [0, 1], got {weight}")
    return weight


class MeanIMM(FineTuning):
    """``L = CE``; after the task ``theta <- a theta + (1 - a) theta_teacher``."""

    name = "imm"
    needs_teacher = True

    def __init__(self, weight: float = 0.6, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.weight = require_weight(weight)

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        interpolate_into(student, task.teacher.model, self.weight, untrained_from_anchor=True)
