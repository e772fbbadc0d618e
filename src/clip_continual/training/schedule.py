"""The task's schedule, a pure function of the step: its length (``plan_training``), the
learning rate of each step, which images each step trains on (``BatchOrder``), and the optimiser
and precision the steps run in.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from clip_continual.training.config import (
    PRECISIONS, SCHEDULES, TrainingConfig, TrainingConfigError, check_choice,
)

logger = logging.getLogger(__name__)


def learning_rate_at(
    step: int, base_lr: float, schedule: str = "constant",
    milestone_steps: Sequence[int] = (), gamma: float = 0.1,
    warmup_steps: int = 0, total_steps: int | None = None, final_lr_ratio: float = 0.0,
) -> float:
    """The learning rate of (0-based) ``step``: constant, times ``gamma`` at each milestone
    already reached, or cosine from ``base_lr`` towards ``final_lr_ratio * base_lr``. The first
    ``warmup_steps`` rise linearly to ``base_lr``. A function of the step alone, so a resumed run
    gets the same rates."""
    if step < warmup_steps:  # ZSCL mtil/src/utils.py _warmup_lr: base_lr * (step + 1) / warmup
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":  # ZSCL mtil/src/utils.py cosine_lr, to 0 at total_steps
        if total_steps is None:
            raise TrainingConfigError("the cosine schedule needs the task's total number of steps")
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        final = final_lr_ratio * base_lr  # DIKI/utils.py:21-25 decays to lr * 1e-3
        return final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - final)
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** sum(1 for milestone in milestone_steps if step >= milestone)
    raise TrainingConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")


@dataclass(frozen=True)
class TrainingPlan:
    num_images: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    milestone_steps: tuple[int, ...]


def step_learning_rate(config: TrainingConfig, plan: TrainingPlan, step: int) -> float:
    return learning_rate_at(step, config.lr, config.schedule, plan.milestone_steps, config.lr_gamma,
                            config.warmup_steps, plan.total_steps, config.final_lr_ratio)


def plan_training(config: TrainingConfig, num_images: int) -> TrainingPlan:
    if num_images < 1:
        raise ValueError("the training set is empty")
    batch_size = min(config.batch_size, num_images)
    steps_per_epoch = math.ceil(num_images / batch_size)
    lengths = []
    if config.steps is not None:
        lengths.append(config.steps)
    if config.epochs is not None:
        lengths.append(max(1, round(config.epochs * steps_per_epoch)))
    milestones = tuple(round(m * steps_per_epoch) for m in config.lr_milestones)
    return TrainingPlan(num_images, batch_size, steps_per_epoch, min(lengths), milestones)


def global_batch_size(plan: TrainingPlan, step: int) -> int:
    """The size of step ``step``'s global batch (the last batch of an epoch may be short)."""
    position = step % plan.steps_per_epoch
    return min(plan.batch_size, plan.num_images - position * plan.batch_size)


class BatchOrder:
    """Epoch-wise shuffling: the batch of a step is a pure function of (seed, epoch, step)."""

    def __init__(self, plan: TrainingPlan, seed: int) -> None:
        self.plan = plan
        self.seed = seed
        self._epoch = -1
        self._order: np.ndarray | None = None

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.plan.steps_per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.plan.num_images)
            self._epoch = epoch
        start = position * self.plan.batch_size
        return self._order[start : start + self.plan.batch_size]



# --- optimiser and precision ------------------------------------------------------------

def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 off CUDA; on CUDA 'auto' is bf16 where supported, else fp16 (with a GradScaler)."""
    check_choice("precision", requested, PRECISIONS)
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            logger.warning("precision %s needs a CUDA device; training in fp32 on %s", requested, device)
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingConfigError("this GPU does not support bf16; use precision 'fp16' or 'auto'")
    return requested


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def build_optimizer(parameters: list[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":  # DIKI/DIKI.py:346-347: torch.optim.SGD(lr, weight_decay), no momentum
        return torch.optim.SGD(parameters, lr=config.lr, weight_decay=config.weight_decay)
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    fused = use_fused_kernel(parameters, config.fused)
    # fused=False is the multi-tensor (foreach) kernel: the fallback where the fused one cannot run.
    return kind(parameters, lr=config.lr, betas=config.betas, eps=config.eps,
                weight_decay=config.weight_decay, fused=fused, foreach=None if fused else True)


def use_fused_kernel(parameters: list[torch.nn.Parameter], setting: bool | None) -> bool:
    """Whether Adam/AdamW take the fused kernel. It halves a whole-model step on CPU (6.9 M
    parameters, mostly the token embedding): benchmarks/step_time.py, ft 141.8 -> 70.3 ms
    (README). It needs every parameter to be a float on CPU or CUDA; None uses it then."""
    possible = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    if setting is True and not possible:
        devices = sorted({p.device.type for p in parameters})
        raise TrainingConfigError(
            f"fused Adam needs float parameters on cpu or cuda, these are on {devices}; "
            f"set continual_learning.training.fused to null or false"
        )
    return possible if setting is None else setting
