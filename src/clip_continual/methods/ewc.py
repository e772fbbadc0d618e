"""EWC (Kirkpatrick et al., PNAS 2017), the classic Fisher-weighted penalty.

Neither CL-CLIP nor ZSCL ships EWC, so this follows the paper: after each task the diagonal
empirical Fisher ``F = E_x[(d log p(y | x) / d theta)^2]`` is estimated from per-image gradients
of the task's cross-entropy (over the task's class prompts, the true label ``y``) on
``fisher_samples`` training images; the next tasks add

    L_EWC = penalty / 2 * sum_i F_i (theta_i - theta*_i)^2

with ``theta*`` the weights the task starts from (the previous task's model). Fishers of
successive tasks are summed (``fisher_decay`` 1; below 1 gives online EWC's decayed sum). The
summed Fisher is handed on between tasks as the method state (arrays ``fisher:<parameter>``).

The sampled images are drawn by row (seeded by the task) and read in batches whether they are in
memory or in files (``TaskImages``: files through the DataLoader at the model's resolution,
the test transform), so both give the same Fisher for the same images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clip_continual.methods.base import (
    Batch, MethodConfigError, TaskContext, class_cross_entropy, image_features, text_features_together,
)
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.memory import draw_indices, replay_rng

PREFIX = "fisher:"
FISHER_BATCH = 64  # sampled images read (and preprocessed) together; gradients stay per image


def ewc_penalty(parameters: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor], penalty: float) -> torch.Tensor:
    """``penalty / 2 * sum_i F_i (theta_i - theta*_i)^2`` over the parameters that have a Fisher."""
    total = sum(((parameters[name].float() - anchor[name]) ** 2 * weight).sum()
                for name, weight in fisher.items())
    return 0.5 * penalty * total


class ElasticWeightConsolidation(FineTuning):
    """``L = CE + penalty / 2 * sum_i F_i (theta_i - theta*_i)^2`` (no penalty in task 1)."""

    name = "ewc"

    def __init__(self, penalty: float = 1000.0, fisher_samples: int = 200, fisher_decay: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if not float(penalty) >= 0:
            raise MethodConfigError(f"penalty must be >= 0, got {penalty}")
        if int(fisher_samples) < 1:
            raise MethodConfigError(f"fisher_samples must be a positive integer, got {fisher_samples}")
        if not 0.0 <= float(fisher_decay) <= 1.0:
            raise MethodConfigError(f"fisher_decay must lie in [0, 1], got {fisher_decay}")
        self.penalty = float(penalty)
        self.fisher_samples = int(fisher_samples)
        self.fisher_decay = float(fisher_decay)
        self.fisher: dict[str, torch.Tensor] = {}
        self._anchor: dict[str, torch.Tensor] | None = None

    def before_task(self, task: TaskContext) -> None:
        self.fisher = {name[len(PREFIX):]: torch.as_tensor(value, device=task.device)
                       for name, value in task.previous_state.items() if name.startswith(PREFIX)}
        self._anchor = None

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(student, batch, task)
        if not self.fisher:
            return terms
        parameters = dict(student.named_parameters())
        unknown = sorted(set(self.fisher) - set(parameters))
        if unknown:
            raise ValueError(f"the stored Fisher names parameters this model lacks: {unknown[:5]}")
        if self._anchor is None:  # the first step sees the weights the task starts from
            self._anchor = {name: parameters[name].detach().float().clone() for name in self.fisher}
        terms["ewc"] = ewc_penalty(parameters, self._anchor, self.fisher, self.penalty)
        return terms

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        self._anchor = None
        if task.train_images is None:
            return
        new = self.estimate_fisher(student, task)
        self.fisher = {name: self.fisher_decay * self.fisher[name] + value if name in self.fisher else value
                       for name, value in new.items()}

    def estimate_fisher(self, student: nn.Module, task: TaskContext) -> dict[str, torch.Tensor]:
        """Mean over sampled training images of the squared per-image log-likelihood gradient."""
        parameters = {n: p for n, p in student.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()}
        images = task.train_images
        rows = draw_indices(len(images), self.fisher_samples, replay_rng(task.seed, 0, stream=2))
        tokens = task.class_tokens[task.current_classes]
        workers = task.workers  # each worker sums its share of the images; the shares are summed
        mine = rows[workers.rank::workers.world_size]
        with torch.enable_grad():
            for chunk, arrays in images.arrays(mine, FISHER_BATCH, "ewc fisher") if len(mine) else ():
                labels = torch.as_tensor(images.labels[chunk], device=task.device).long()
                batch_pixels = task.preprocess(arrays)
                for i in range(len(chunk)):
                    grads = self._log_likelihood_gradient(student, parameters, batch_pixels[i : i + 1],
                                                          labels[i : i + 1], tokens, task)
                    for name, grad in zip(parameters, grads):
                        if grad is not None:
                            fisher[name] += grad.float() ** 2
        return {name: workers.sum(value) / len(rows) for name, value in fisher.items()}

    @staticmethod
    def _log_likelihood_gradient(student: nn.Module, parameters: dict[str, torch.Tensor], pixels: torch.Tensor,
                                 label: torch.Tensor, tokens: torch.Tensor, task: TaskContext):
        with task.autocast():
            (text,) = text_features_together(student, tokens)
            logits = student.logit_scale.exp() * image_features(student, pixels) @ text.t()
            loss = class_cross_entropy(logits, label, task)
        return torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)

    def extra_storage_bytes(self, task: TaskContext, student: nn.Module) -> dict[str, int]:
        """The Fisher handed on, and the float32 copy of the weights the penalty pulls towards."""
        anchor = sum(value.numel() * 4 for value in self.fisher.values())
        return super().extra_storage_bytes(task, student) | ({"anchor": anchor} if anchor else {})

    def export_state(self) -> dict[str, np.ndarray]:
        return {PREFIX + name: value.detach().cpu().numpy() for name, value in self.fisher.items()}
