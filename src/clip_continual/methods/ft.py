"""FT: plain fine-tuning, cross-entropy over image -> class-prompt logits."""

from __future__ import annotations

import torch
from torch import nn

from clip_continual.methods.base import (
    Batch, ContinualMethod, TaskContext, class_cross_entropy, image_features,
    text_features_together,
)


class FineTuning(ContinualMethod):
    """``L = CE(s * f_I(x) . f_T(C_current), y)``, s the student's exp(logit_scale).

    In MST only the current phase's prompts are encoded: the logits of other classes would be
    masked out of the CE anyway, so leaving them out is the same loss for less work.
    """

    name = "ft"

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        image = image_features(student, batch.pixels)
        (text,) = text_features_together(student, task.class_tokens[task.current_classes])
        logits = student.logit_scale.exp() * image @ text.t()
        return {"ce": class_cross_entropy(logits, batch.labels, task, self.label_smoothing)}
