"""A-GEM as the paper's code runs it (CL-CLIP ``methods/agem.py``, replay data in ``data.py``
``Replayed`` / ``Replayed_MST`` and ``main.py``).

Each step the cross-entropy gradient ``g`` of the current task is projected when it would
increase the replay loss: with ``g_ref`` the gradient of CLIP's symmetric contrastive loss on a
replayed batch of image-text pairs, ``g <- g - (g . g_ref / g_ref . g_ref) g_ref`` if
``g . g_ref < 0``. The replayed pairs are the reference set (the paper: a LAION subset; the
embedded default: held-back shapes-world pairs, catalog ``reference_set``) plus, after every
finished task, ``per_task_memory`` random training images of that task paired with their class
prompts (CL-CLIP's ``Replayed_MST`` keeps 250 per phase); the memory, prompts tokenized (a
label names another class on another MTIL dataset), is handed on between tasks as the method
state. On the named benchmarks the reference set is ``<benchmark>.reference_set``
(``clip_continual.data.reference``) and training images read from files are kept as pixels at
the model's resolution, where the reference set is decoded too. The replayed batch has the
training batch's size (CL-CLIP's replay loader shares ``--batch``).

Differences from that code, on purpose: it reads the replay images from the *training* batch
(``RI = data['image']``, an evident slip), here they are the replayed ones; the projection
sees unscaled gradients and comes before the loop's clipping (CL-CLIP does not clip A-GEM).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clip_continual.methods.base import Batch, MethodConfigError, TaskContext, reference_set_bytes
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.gradients import (
    agem_project, flat_gradient, gradient_vector, set_flat_gradient, trainable_parameters,
)
from clip_continual.methods.memory import (
    Exemplars, contrastive_loss, draw_indices, random_exemplars, replay_rng,
)

REFERENCE_GROUP = -1  # the ``tasks`` value of reference-set pairs


def _prompt_tokens(task: TaskContext, labels: np.ndarray) -> np.ndarray:
    """The tokenized class prompts of ``labels`` in this task's class names."""
    return task.class_tokens[torch.as_tensor(labels, device=task.device)].cpu().numpy().astype(np.int64)


class AveragedGEM(FineTuning):
    """``L = CE`` (as ft); the gradient is projected against the replayed pairs' gradient."""

    name = "agem"
    needs_inputs = ("reference_set",)
    replays_pairs = True  # the reference set must hold image-caption pairs (CL-CLIP: a LAION subset)

    def __init__(self, per_task_memory: int = 250, reference_batch_size: int | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if int(per_task_memory) < 0:
            raise MethodConfigError(f"per_task_memory must be >= 0, got {per_task_memory}")
        if reference_batch_size is not None and int(reference_batch_size) < 2:
            raise MethodConfigError(f"reference_batch_size must be >= 2 or null, got {reference_batch_size}")
        self.per_task_memory = int(per_task_memory)
        self.reference_batch_size = None if reference_batch_size is None else int(reference_batch_size)
        self.memory: Exemplars | None = None
        self.memory_tokens: np.ndarray | None = None  # each memory image's class prompt, tokenized
        self._pairs: tuple[np.ndarray, torch.Tensor, np.ndarray] | None = None

    def before_task(self, task: TaskContext) -> None:
        reference = task.extras["reference_set"]
        if reference.captions is None:
            raise ValueError("the reference set needs captions (image-text pairs) for A-GEM / GEM replay")
        # Training images read from files (the named benchmarks) come at the model's resolution,
        # as the reference set is decoded there; in-memory sets at their own size.
        shape = tuple(reference.images.shape[1:] if task.train_images is None else task.train_images.image_shape)
        self.memory = Exemplars.from_state(task.previous_state, shape)
        if reference.images.shape[1:] != shape:
            raise ValueError(
                f"reference images are {reference.images.shape[1:]}, training images {shape}; "
                "prepare both at one image size"
            )
        self.memory_tokens = self._stored_tokens(task)
        tokens = torch.cat([task.tokenize(list(reference.captions[:, 0])),
                            torch.as_tensor(self.memory_tokens, device=task.device)])
        images = np.concatenate([reference.images, self.memory.images])
        groups = np.concatenate([np.full(len(reference), REFERENCE_GROUP), self.memory.tasks])
        self._pairs = (images, tokens, groups)

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._pairs = None
        if self.memory is None or task.train_images is None:
            return
        rng = replay_rng(task.seed, 0, stream=1)
        added = random_exemplars(task.train_images, task.current_classes.tolist(), self.per_task_memory,
                                 task.task_index, rng)
        self.memory = self.memory.plus(added)
        self.memory_tokens = np.concatenate([self.memory_tokens, _prompt_tokens(task, added.labels)])

    def _stored_tokens(self, task: TaskContext) -> np.ndarray:
        """The memory's prompts as the tasks that added it tokenized them: a label means another
        class on another dataset (MTIL), so the prompt travels with the image."""
        stored = task.previous_state.get("memory_tokens")
        if stored is not None:
            return np.asarray(stored, np.int64)
        return _prompt_tokens(task, self.memory.labels)

    def export_state(self) -> dict[str, np.ndarray]:
        if self.memory is None:
            return {}
        return {**self.memory.to_state(), "memory_tokens": self.memory_tokens}

    def extra_storage_bytes(self, task: TaskContext, student: nn.Module) -> dict[str, int]:
        """The memory handed on and the reference pairs replayed beside it."""
        return super().extra_storage_bytes(task, student) | {
            "reference_set": reference_set_bytes(task.extras.get("reference_set"))}

    def replay_gradient(self, student: nn.Module, parameters: list[nn.Parameter], rows: np.ndarray,
                        task: TaskContext) -> torch.Tensor:
        images, tokens, _ = self._pairs
        pixels = task.preprocess(images[rows])
        with task.autocast():
            loss = contrastive_loss(student, pixels, tokens[torch.as_tensor(rows, device=tokens.device)])
        return gradient_vector(loss, parameters)

    def replay_rows(self, batch: Batch, task: TaskContext, group: int | None = None, stream: int = 0) -> np.ndarray:
        """The replayed batch of this step: a pure function of (seed, step, group)."""
        _, _, groups = self._pairs
        pool = np.arange(len(groups)) if group is None else np.flatnonzero(groups == group)
        size = self.reference_batch_size or batch.global_size  # every worker replays the whole batch
        return pool[draw_indices(len(pool), size, replay_rng(task.seed, batch.step, stream))]

    def before_optimizer_step(self, student: nn.Module, batch: Batch, task: TaskContext) -> None:
        parameters = trainable_parameters(student)
        reference = self.replay_gradient(student, parameters, self.replay_rows(batch, task), task)
        set_flat_gradient(parameters, agem_project(flat_gradient(parameters), reference))
