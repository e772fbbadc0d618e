"""GEM (Lopez-Paz & Ranzato, NeurIPS 2017) on the replay memory of A-GEM.

CL-CLIP's ``methods/gem.py`` does not run as published (``G`` and ``reference_gradients`` are
never defined, and ``main.py`` does not offer it), so the update rule follows GEM's own
formulation (the dual QP of facebookresearch/GradientEpisodicMemory, margin
``memory_strength`` 0.5) on the same replayed pairs as ``agem``: one constraint per episode,
the reference set being one episode and every finished task's memory another. Each step draws
one replayed batch per episode, computes its contrastive-loss gradient ``g_k`` and, when some
``g . g_k < 0``, replaces ``g`` by the closest gradient with ``g~ . g_k >= 0`` for all k.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clip_continual.methods.agem import AveragedGEM
from clip_continual.methods.base import Batch, MethodConfigError, TaskContext
from clip_continual.methods.gradients import (
    flat_gradient, gem_project, set_flat_gradient, trainable_parameters,
)


class GradientEpisodicMemory(AveragedGEM):
    """``L = CE`` (as ft); the gradient is projected onto the cone of every episode's gradient."""

    name = "gem"

    def __init__(self, per_task_memory: int = 250, reference_batch_size: int | None = None,
                 memory_strength: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(per_task_memory=per_task_memory, reference_batch_size=reference_batch_size,
                         label_smoothing=label_smoothing)
        if not float(memory_strength) >= 0:
            raise MethodConfigError(f"memory_strength must be >= 0, got {memory_strength}")
        self.memory_strength = float(memory_strength)

    def before_optimizer_step(self, student: nn.Module, batch: Batch, task: TaskContext) -> None:
        parameters = trainable_parameters(student)
        episodes = [int(g) for g in np.unique(self._pairs[2])]
        constraints = torch.stack([
            self.replay_gradient(student, parameters, self.replay_rows(batch, task, episode, stream), task)
            for stream, episode in enumerate(episodes)
        ])
        projected = gem_project(flat_gradient(parameters), constraints, self.memory_strength)
        set_flat_gradient(parameters, projected)
