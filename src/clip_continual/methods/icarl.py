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

Training images read from files (the real-data benchmarks) are handled alike: herding reads the
new classes' images once through the DataLoader (test transform, batches of ``FEATURE_BATCH``),
then only the chosen ones are read again. The memory keeps their pixels as decoded at the
model's resolution S (uint8, S x S x 3: the test transform before normalisation, so replaying
them feeds the model exactly the test transform's input), not references to files: later tasks
read other datasets (MTIL) whose files the node does not get, and pixels make the stored state
self-contained, so a resume is exact whatever happens to the files. ZSCL does the same, keeping
the preprocessed 224 px tensors of up to 5,000 images (``DynamicDataset.ref_database``). Its
size is ``len(memory) * 3 S^2`` bytes (2,000 exemplars at 224 px: 300 MB), logged per task; set
``budget`` to bound it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from clip_continual.methods.base import (
    Batch, MethodConfigError, TaskContext, image_features, soft_target_cross_entropy,
)
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.memory import Exemplars, draw_indices, herding_order, replay_rng

logger = logging.getLogger(__name__)

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
        images = task.train_images
        earlier = Exemplars.from_state(task.previous_state, images.image_shape)
        self.memory = cut_to_budget(earlier.plus(self.select(task)), self.per_class, self.budget)
        logger.info("icarl memory: %d exemplars of %d classes (%.1f MB)", len(self.memory),
                    len(np.unique(self.memory.labels)), self.memory.images.nbytes / 2**20)
        self._teacher_text = task.teacher.text_features(task.class_tokens[task.current_classes])

    def select(self, task: TaskContext) -> Exemplars:
        """``per_class`` exemplars of each current class, in herding (or random) order."""
        images = task.train_images
        classes = task.current_classes.tolist()
        pool = np.flatnonzero(np.isin(images.labels, classes))
        features = self.teacher_features(task, pool) if self.selection == "herding" else None
        rng = replay_rng(task.seed, 0, stream=3)
        chosen = []
        for label in classes:
            positions = np.flatnonzero(images.labels[pool] == label)
            if features is not None:
                order = herding_order(features[positions], self.per_class)
            else:
                order = rng.permutation(len(positions))[: self.per_class]
            chosen.append(pool[positions[order]])
        rows = np.concatenate(chosen)
        return Exemplars(images.gather(rows, FEATURE_BATCH, "icarl exemplars"), images.labels[rows].astype(np.int64),
                         np.full(len(rows), task.task_index, np.int64))

    def teacher_features(self, task: TaskContext, rows: np.ndarray) -> np.ndarray:
        """The teacher's image features of ``rows``, in that order (one pass over the images)."""
        chunks = [task.teacher.image_features(task.preprocess(pixels))
                  for _, pixels in task.train_images.arrays(rows, FEATURE_BATCH, "icarl herding features")]
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
        # As many exemplars as the global batch has; each worker encodes its part, the logits are
        # the whole replayed batch's (the text term is a softmax over its images).
        rows = draw_indices(len(self.memory), batch.global_size, replay_rng(task.seed, batch.step))
        pixels = task.preprocess(self.memory.images[rows[task.workers.part(len(rows))]])
        scale = student.logit_scale.exp()
        workers = task.workers
        logits = scale * workers.gather(image_features(student, pixels)) @ self._teacher_text.t()
        teacher_logits = scale.detach() * workers.gather(task.teacher.image_features(pixels)) @ self._teacher_text.t()
        weight, temperature = self.distillation_weight, self.temperature
        terms["icarl_image"] = weight * soft_target_cross_entropy(logits, teacher_logits, temperature)
        terms["icarl_text"] = weight * soft_target_cross_entropy(logits.t(), teacher_logits.t(), temperature)
        return terms
