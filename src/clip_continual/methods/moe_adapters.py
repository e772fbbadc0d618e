"""MoE-Adapters: a frozen CLIP with routed adapter experts in every transformer block.

Follows MoE-Adapters (Yu et al., CVPR 2024), ``mtil/clip/model.py`` (ResidualAttentionBlock:
experts, per-task routers, noisy top-k gating), ``mtil/clip/adapter.py`` (the expert),
``mtil/src/models/finetune.py`` (only adapters and routers train; after each task the two most
chosen experts of every block are frozen for later tasks) and
``mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh`` (22 experts, top-2,
bottleneck 64, both encoders, label smoothing 0.2). The modules live in
``clip_continual.adapters``.

Not taken over: the reference computes a load-balancing loss in each block but never adds it
to the training loss, so neither do we.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clip_continual.adapters import (
    TOWERS_OF_PARTS, adapter_recipe, add_adapters, fit_autoencoder, frozen_image_features, mixtures,
)
from clip_continual.methods.base import MethodConfigError, TaskContext, evaluation_mode
from clip_continual.methods.ft import FineTuning


class MoEAdapters(FineTuning):
    """``L = CE`` as ``ft`` (label smoothing 0.2 as published), trained only through the
    adapters: each block adds ``sum_e g_e(x_0) * A_e(x)`` to its residual stream, ``A_e`` the
    experts (``0.1 * up(relu(down(x)))``), ``g`` the task's router (softmax over the noisy top-k
    logits of the first token x_0). Each task gets a new router; experts are shared, and after
    a task the ``frozen_per_task`` experts its router chose most are frozen for good.

    ``ddas``: after each task an autoencoder learns the task's images (``ddas_steps`` Adam
    steps) and at evaluation every image takes the router of the task that reconstructs it
    best, or no adapter when its error exceeds the ``ddas_quantile`` quantile of that task's
    training errors (``clip_continual.adapters.TaskSelector``). Without it the latest router
    serves every input, as the reference evaluates without DDAS; the text tower always uses
    the latest router (text carries no image to discriminate).
    """

    name = "moe_adapters"

    def __init__(self, experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 frozen_per_task: int = 2, ddas: bool = False, ddas_steps: int = 300,
                 ddas_quantile: float = 0.95, label_smoothing: float = 0.2) -> None:
        super().__init__(label_smoothing=label_smoothing)
        for key, value in (("experts", experts), ("top_k", top_k), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodConfigError(f"{key} must be a positive integer, got {value!r}")
        if top_k > experts:
            raise MethodConfigError(f"top_k ({top_k}) cannot exceed experts ({experts})")
        if isinstance(frozen_per_task, bool) or not isinstance(frozen_per_task, int) or frozen_per_task < 0:
            raise MethodConfigError(f"frozen_per_task must be an integer >= 0, got {frozen_per_task!r}")
        self.experts, self.top_k, self.bottleneck = experts, top_k, bottleneck
        self.frozen_per_task = frozen_per_task
        if isinstance(ddas_steps, bool) or not isinstance(ddas_steps, int) or ddas_steps < 1:
            raise MethodConfigError(f"ddas_steps must be a positive integer, got {ddas_steps!r}")
        if not 0.0 < float(ddas_quantile) <= 1.0:
            raise MethodConfigError(f"ddas_quantile must lie in (0, 1], got {ddas_quantile}")
        self.ddas, self.ddas_steps, self.ddas_quantile = bool(ddas), ddas_steps, float(ddas_quantile)

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {"kind": "moe", "experts": self.experts, "top_k": self.top_k,
                               "bottleneck": self.bottleneck, "routers": 0,
                               "towers": TOWERS_OF_PARTS[parts], "ddas": self.ddas, "ddas_tasks": 0})
        for mixture in mixtures(student):
            mixture.add_router()
        adapter_recipe(student)["routers"] += 1

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        with torch.no_grad():
            for mixture in mixtures(student):
                count = min(self.frozen_per_task, len(mixture.experts))
                if count:
                    mixture.frozen[mixture.usage.topk(count).indices] = True
        if self.ddas:
            self._fit_task_selector(task, student)

    def _fit_task_selector(self, task: TaskContext, student: nn.Module) -> None:
        """One more autoencoder, for this task's images; its threshold from their errors."""
        images = task.train_images
        if images is None or task.preprocess is None:
            raise ValueError("moe_adapters with ddas needs the task's training images in TaskContext")
        with torch.no_grad(), evaluation_mode(student):
            features = torch.cat([
                frozen_image_features(student.visual, task.preprocess(pixels))
                for _, pixels in images.arrays(np.arange(len(images)), 256, "ddas features")
            ]).float()
        selector = student.visual.task_selector
        autoencoder = selector.add_task()
        fit_autoencoder(autoencoder, features, self.ddas_steps, seed=task.task_index)
        with torch.no_grad():
            errors = selector.errors(features)[:, -1]
            selector.thresholds[-1] = torch.quantile(errors, self.ddas_quantile)
        adapter_recipe(student)["ddas_tasks"] += 1
