"""LwF-VR as ZSCL re-implements it: image-encoder distillation against fixed pseudo-words."""

from __future__ import annotations

import torch
from torch import nn

from clip_continual.methods.base import (
    Batch, ContinualMethod, MethodConfigError, TaskContext, class_cross_entropy, image_features,
    require_alpha, soft_target_cross_entropy, text_features_together,
)


class ZsclVocabularyReplay(ContinualMethod):
    """``L = CE + w * (D(z, z_old) + D(z^T, z_old^T))`` with D the soft-target cross-entropy at
    temperature T (default 2) scaled by T^2, averaged over rows.

    ``z = s * f_I(x) . f_T_old(V)`` and ``z_old = s * f_I_old(x) . f_T_old(V)``: the teacher's
    text features of the vocabulary V are used on both sides, so only the image encoder is
    regularised. s is the student's exp(logit_scale) on both sides, as in ZSCL's code (there the
    scale never trains); it is detached on the teacher side, whose logits are targets. The
    transposed term distils vocabulary -> image logits (rows = pseudo-words, softmax over the
    batch's images).

    ZSCL distils on a separate, un-augmented batch. Here the distillation batch is the
    un-augmented version of the training batch: with ``augment: none`` that is the very same
    batch (the student's image features are shared with the CE), with ``crop_flip`` the clean
    images take one extra student image forward. The published vocabulary is ``fixed``
    (1000 x 10 ids, drawn once per task), whose teacher features are computed once per task.
    """

    name = "vr_lwf_zscl"
    needs_teacher = True
    needs_vocabulary = True
    default_vocabulary_mode = "fixed"
    uses_teacher_images = True
    distills_clean_images = True

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0, transposed: bool = True,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.alpha = require_alpha(alpha)
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise MethodConfigError(f"temperature must be positive, got {temperature}")
        self.transposed = bool(transposed)
        self._teacher_vocab_text: torch.Tensor | None = None

    def before_task(self, task: TaskContext) -> None:
        if task.vocabulary is not None and task.vocabulary.fixed_within_task:
            rows = task.vocabulary.task_table(task.task_index).to(task.device)
            self._teacher_vocab_text = task.teacher.text_features(rows)

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._teacher_vocab_text = None

    term_prefix = "vr"  # the logged loss terms: vr_image, vr_text

    def distillation_texts(self, batch: Batch, task: TaskContext) -> torch.Tensor:
        """The teacher's text features the logits are taken against: the vocabulary's."""
        if self._teacher_vocab_text is not None:
            return self._teacher_vocab_text
        if batch.vocab_tokens is None:
            raise ValueError(f"{self.name} needs the replayed vocabulary's rows in every batch")
        return task.teacher.text_features(batch.vocab_tokens)

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        scale = student.logit_scale.exp()
        image = image_features(student, batch.pixels)
        (class_text,) = text_features_together(student, task.class_tokens[task.current_classes])
        terms = {"ce": class_cross_entropy(scale * image @ class_text.t(), batch.labels, task,
                                           self.label_smoothing)}

        distil_image = image if batch.clean_pixels is None else image_features(student, batch.clean_pixels)
        teacher = task.teacher
        teacher_image = teacher.image_features_for(batch, clean=True)
        if self.transposed:  # the text -> image direction is a softmax over the global batch's images
            distil_image, teacher_image = task.workers.gather(distil_image), task.workers.gather(teacher_image)
        texts = self.distillation_texts(batch, task)
        logits = scale * distil_image @ texts.t()
        teacher_logits = scale.detach() * teacher_image @ texts.t()
        terms[f"{self.term_prefix}_image"] = self.alpha * soft_target_cross_entropy(logits, teacher_logits,
                                                                                    self.temperature)
        if self.transposed:
            terms[f"{self.term_prefix}_text"] = self.alpha * soft_target_cross_entropy(
                logits.t(), teacher_logits.t(), self.temperature)
        return terms
