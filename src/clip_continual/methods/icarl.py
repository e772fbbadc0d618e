"""iCaRL as ZSCL runs it for CLIP (class-incremental code ``cil/continual_clip/models.py``
with ``cil/continual_clip/dynamic_dataset.py``; MTIL ``mtil/src/models/icarl.py``).

An exemplar memory of images is replayed with every task's data. Loss per step:

    L = CE + w * (D_T(z_mem, z_mem_old) + D_T(z_mem^T, z_mem_old^T))

with ``z_mem = s * f_I(m) . f_T_old(C_current)`` for a replayed batch ``m`` of memory images,
``z_mem_old`` the same with the teacher's image features, D_T ZSCL's soft-target cross-entropy
at T = 2 scaled by T^2, the transposed term over the batch's images, w = 5 (ZSCL's
class-incremental weight) and s the student's scale. Teacher: the previous task's model (ZSCL:
"last-task model"); texts: the current task's class prompts (ZSCL's iCaRL has no reference
sentences).

The memory, as ZSCL's ``DynamicDataset`` builds it at the start of each task with the model
the task starts from: the new task's images are added by herding on that model's image
features (or at random, ``selection: random``), and older entries are cut back, so the current
task's images are replayed too. Unlike ZSCL (one budget per task) the memory is kept per class,
as iCaRL's: at most ``per_class`` images of each seen class, and never more than ``budget``
images in all (each class then keeps ``budget // classes``, the first ones herding chose). The
memory is the method state, a catalog artifact, so a resumed run replays the same images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clip_continual.methods.base import (
    Batch, MethodConfigError, TaskContext, image_features, soft_target_cross_entropy,
)
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.memory import Exemplars, draw_indices, herding_order, replay_rng

SELECTIONS = ("herding", "random")
FEATURE_BATCH = 256


def cut_to_budget(memory: Exemplars, per_class: int, budget: int | None) -> Exemplars:
    """Keep the first ``min(per_class, budget // classes)`` exemplars of every class."""
    classes = np.unique(memory.labels)
    keep_each = per_class if budget is None or not len(classes) else min(per_class, budget // len(classes))
    keep = np.zeros(len(memory), bool)
    for label in classes:
        keep[np.flatnonzero(memory.labels == label)[:keep_each]] = True
    return memory.where(keep)


class ICaRL(FineTuning):
    """``L = CE + w (D_T(z_mem, z_mem_old) + D_T(z_mem^T, z_mem_old^T))`` on replayed exemplars."""

    name = "icarl"
    needs_teacher = True

    def __init__(self, per_class: int = 20, budget: int | None = None, selection: str = "herding",
                 distillation_weight: float = 5.0, temperature: float = 2.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if int(per_class) < 1:
            raise MethodConfigError(f"per_class must be a positive integer, got {per_class}")
        if budget is not None and int(budget) < 1:
            raise MethodConfigError(f"budget must be a positive integer or null, got {budget}")
        if selection not in SELECTIONS:
            raise MethodConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if not float(distillation_weight) >= 0 or not float(temperature) > 0:
            raise MethodConfigError("distillation_weight must be >= 0 and temperature > 0")
        self.per_class, self.selection = int(per_class), selection
        self.budget = None if budget is None else int(budget)
        self.distillation_weight, self.temperature = float(distillation_weight), float(temperature)
        self.memory: Exemplars | None = None
        self._teacher_text: torch.Tensor | None = None

    def before_task(self, task: TaskContext) -> None:
        earlier = Exemplars.from_state(task.previous_state, task.train_set.images.shape[1:])
        self.memory = cut_to_budget(earlier.plus(self.select(task)), self.per_class, self.budget)
        self._teacher_text = task.teacher.text_features(task.class_tokens[task.current_classes])

    def select(self, task: TaskContext) -> Exemplars:
        """``per_class`` exemplars of each current class, in herding (or random) order."""
        selected = Exemplars.empty(task.train_set.images.shape[1:])
        rng = replay_rng(task.seed, 0, stream=3)
        for label in task.current_classes.tolist():
            rows = np.flatnonzero(task.train_set.labels == label)
            if self.selection == "herding":
                order = herding_order(self.teacher_features(task, rows), self.per_class)
            else:
                order = rng.permutation(len(rows))[: self.per_class]
            chosen = rows[order]
            selected = selected.plus(Exemplars(task.train_set.images[chosen], np.full(len(chosen), label),
                                               np.full(len(chosen), task.task_index)))
        return selected

    def teacher_features(self, task: TaskContext, rows: np.ndarray) -> np.ndarray:
        chunks = [task.teacher.image_features(task.preprocess(task.train_set.images[rows[i : i + FEATURE_BATCH]]))
                  for i in range(0, len(rows), FEATURE_BATCH)]
        return torch.cat(chunks).cpu().numpy()

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._teacher_text = None

    def export_state(self) -> dict[str, np.ndarray]:
        return {} if self.memory is None else self.memory.to_state()

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(student, batch, task)
        if not len(self.memory):  # a budget below one exemplar per class leaves nothing to replay
            zero = terms["ce"] * 0.0
            return {**terms, "icarl_image": zero, "icarl_text": zero}
        rows = draw_indices(len(self.memory), len(batch.labels), replay_rng(task.seed, batch.step))
        pixels = task.preprocess(self.memory.images[rows])
        scale = student.logit_scale.exp()
        logits = scale * image_features(student, pixels) @ self._teacher_text.t()
        teacher_logits = scale.detach() * task.teacher.image_features(pixels) @ self._teacher_text.t()
        weight, temperature = self.distillation_weight, self.temperature
        terms["icarl_image"] = weight * soft_target_cross_entropy(logits, teacher_logits, temperature)
        terms["icarl_text"] = weight * soft_target_cross_entropy(logits.t(), teacher_logits.t(), temperature)
        return terms
