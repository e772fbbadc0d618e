"""VR-LwF (the paper's): LwF with a replayed vocabulary of random pseudo-words."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.methods.base import (
    Batch, ContinualMethod, TaskContext, class_cross_entropy, distillation_kl, image_features,
    require_alpha, text_features_together,
)


class VocabularyReplayLwF(ContinualMethod):
    """``L = CE + alpha * (L_LwF + L_VR)``.

    ``L_VR = KL(softmax(z_vr_old) || softmax(z_vr))`` (T = 1, batchmean) with
    ``z_vr = s * f_I(x) . f_T(P)`` (the student's own text encoder embeds the pseudo-words P, so
    both encoders are regularised) and ``z_vr_old = s_old * f_I_old(x) . f_T_old(P)``.

    ``L_LwF`` is the same KL over the logits of every seen class. It only exists when earlier
    tasks left classes to remember (MST after phase 1, teacher = previous model): in phase 1 and
    in OST it is zero, which gives the paper's OST loss ``CE + alpha * L_VR``.
    ``class_distillation=False`` drops the term altogether.

    Work done once per task rather than per step: the teacher's class-text features, the
    teacher's pseudo-word features when the vocabulary is fixed within the task, and (by the
    loop) the teacher's image features when images are not augmented. Per step, the student's
    class prompts and pseudo-words go through the text tower in one forward.
    """

    name = "vr_lwf"
    needs_teacher = True
    needs_vocabulary = True
    default_vocabulary_mode = "paper"
    uses_teacher_images = True

    def __init__(self, alpha: float = 0.5, class_distillation: bool = True, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.alpha = require_alpha(alpha)
        self.class_distillation = bool(class_distillation)
        self._teacher_class_text: torch.Tensor | None = None
        self._teacher_vocab_text: torch.Tensor | None = None

    def distils_classes(self, task: TaskContext) -> bool:
        return self.class_distillation and task.has_earlier_classes

    def before_task(self, task: TaskContext) -> None:
        if self.distils_classes(task):
            self._teacher_class_text = task.teacher.text_features(task.class_tokens[task.seen_classes])
        if task.vocabulary is not None and task.vocabulary.fixed_within_task:
            rows = task.vocabulary.task_table(task.task_index).to(task.device)
            self._teacher_vocab_text = task.teacher.text_features(rows)

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._teacher_class_text = None
        self._teacher_vocab_text = None

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        if batch.vocab_tokens is None:
            raise ValueError("vr_lwf needs the replayed vocabulary's rows in every batch")
        distil_classes = self.distils_classes(task)
        classes = task.seen_classes if distil_classes else task.current_classes
        class_text, vocab_text = text_features_together(student, task.class_tokens[classes], batch.vocab_tokens)
        image = image_features(student, batch.pixels)
        logits = student.logit_scale.exp() * image @ torch.cat([class_text, vocab_text]).t()
        class_logits, vocab_logits = logits.split([len(class_text), len(vocab_text)], dim=1)

        current_logits = class_logits[:, task.current_in_seen] if distil_classes else class_logits
        terms = {"ce": class_cross_entropy(current_logits, batch.labels, task, self.label_smoothing)}

        teacher = task.teacher
        teacher_image = teacher.image_features_for(batch)
        teacher_vocab = self._teacher_vocab_text
        if teacher_vocab is None:
            teacher_vocab = teacher.text_features(batch.vocab_tokens)
        if self.class_distillation:
            if distil_classes:
                teacher_class_logits = teacher.scale * teacher_image @ self._teacher_class_text.t()
                terms["lwf"] = self.alpha * distillation_kl(class_logits, teacher_class_logits)
            else:
                terms["lwf"] = torch.zeros((), device=logits.device)
        terms["vr"] = self.alpha * distillation_kl(vocab_logits, teacher.scale * teacher_image @ teacher_vocab.t())
        return terms


def reference_vr_lwf_terms(
    student: nn.Module,
    teacher: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_tokens: torch.Tensor,
    current_classes: list[int],
    seen_classes: list[int],
    vocab_tokens: torch.Tensor,
    alpha: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The paper's VR-LwF loss computed the straightforward way: every feature recomputed each
    call at full context length, logits over all classes with the non-current ones masked to
    -inf, separate text forwards, the teacher under ``no_grad``. The fast method must match it."""
    scale = student.logit_scale.exp()
    image = F.normalize(student.encode_image(pixels), dim=-1)
    class_text = F.normalize(student.encode_text(class_tokens), dim=-1)
    vocab_text = F.normalize(student.encode_text(vocab_tokens), dim=-1)
    with torch.no_grad():
        teacher_scale = teacher.logit_scale.exp()
        teacher_image = F.normalize(teacher.encode_image(pixels), dim=-1)
        teacher_class_text = F.normalize(teacher.encode_text(class_tokens), dim=-1)
        teacher_vocab_text = F.normalize(teacher.encode_text(vocab_tokens), dim=-1)

    all_logits = scale * image @ class_text.t()
    mask = torch.full_like(all_logits, float("-inf"))
    mask[:, current_classes] = 0.0
    ce = F.cross_entropy(all_logits + mask, labels)

    earlier = sorted(set(seen_classes) - set(current_classes))
    if earlier:
        teacher_logits = teacher_scale * teacher_image @ teacher_class_text.t()
        lwf = F.kl_div(F.log_softmax(all_logits[:, seen_classes], dim=1),
                       F.softmax(teacher_logits[:, seen_classes], dim=1), reduction="batchmean")
    else:
        lwf = torch.zeros(())
    vr = F.kl_div(F.log_softmax(scale * image @ vocab_text.t(), dim=1),
                  F.softmax(teacher_scale * teacher_image @ teacher_vocab_text.t(), dim=1),
                  reduction="batchmean")
    return {"ce": ce, "lwf": alpha * lwf, "vr": alpha * vr}
