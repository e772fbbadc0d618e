"""WiSE-FT as ZSCL runs it (``mtil/src/models/finetune.py``, ``--wise_merge``; ``args.py``:
``--wise_ft_alpha 0.8``, ``--wise_ft_model n | zeroshot``).

Train with plain cross-entropy (as ft), then after the task
``theta = (1 - a) * theta_anchor + a * theta_ft`` over all weights, a = 0.8. The anchor is the
run's teacher (``continual_learning.teacher``): ``previous``, the model the task started from
(ZSCL's default ``n``, the loaded model), or ``pretrained``, the zero-shot model (``zeroshot``).
The merged model is the task's model, so the next task starts from it, as in ZSCL.
"""

from __future__ import annotations

from torch import nn

from clip_continual.methods.base import TaskContext
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.imm import require_weight
from clip_continual.model.weights import interpolate_into


class WiseFineTuning(FineTuning):
    """``L = CE``; after the task ``theta <- (1 - a) theta_anchor + a theta``."""

    name = "wise_ft"
    needs_teacher = True

    def __init__(self, weight: float = 0.8, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.weight = require_weight(weight)

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        interpolate_into(student, task.teacher.model, self.weight)
