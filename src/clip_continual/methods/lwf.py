"""LwF: fine-tuning plus distillation of the teacher's class-prompt logits."""

from __future__ import annotations

import torch
from torch import nn

from clip_continual.methods.base import (
    Batch, ContinualMethod, TaskContext, class_cross_entropy, distillation_kl, image_features,
    require_alpha, text_features_together,
)


class LearningWithoutForgetting(ContinualMethod):
    """``L = CE + alpha * KL(softmax(z_old) || softmax(z))`` over the logits of every seen class
    (current phase included), T = 1, batchmean.

    ``z = s * f_I(x) . f_T(C_seen)`` with the student's scale; ``z_old = s_old * f_I_old(x) .
    f_T_old(C_seen)`` with the teacher's own scale. The teacher's class-text features are
    computed once per task; its image features come from the loop's per-task table when the
    images are not augmented.
    """

    name = "lwf"
    needs_teacher = True
    uses_teacher_images = True

    def __init__(self, alpha: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.alpha = require_alpha(alpha)
        self._teacher_class_text: torch.Tensor | None = None

    def before_task(self, task: TaskContext) -> None:
        self._teacher_class_text = task.teacher.text_features(task.class_tokens[task.seen_classes])

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._teacher_class_text = None

    def teacher_class_logits(self, batch: Batch, task: TaskContext) -> torch.Tensor:
        teacher_image = task.teacher.image_features_for(batch)
        return task.teacher.scale * teacher_image @ self._teacher_class_text.t()

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        image = image_features(student, batch.pixels)
        (text,) = text_features_together(student, task.class_tokens[task.seen_classes])
        logits_seen = student.logit_scale.exp() * image @ text.t()
        ce = class_cross_entropy(logits_seen[:, task.current_in_seen], batch.labels, task, self.label_smoothing)
        lwf = distillation_kl(logits_seen, self.teacher_class_logits(batch, task))
        return {"ce": ce, "lwf": self.alpha * lwf}
