"""The training loop's view of data parallelism; ``Replica`` is one process training alone.

A data-parallel replica (``distributed.DataParallelReplica``) trains ``part`` of every global
batch, computes the loss terms through ``loss_terms`` (a ``DistributedDataParallel`` wrapper
that averages gradients across replicas in backward), ``reduce``s logged numbers to the
global batch's and offers the methods ``gather`` and ``sum`` (``methods.base.Workers``).

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from clip_continual.methods.base import Batch, ContinualMethod, TaskContext, Workers

LossTerms = Callable[[Batch], dict[str, torch.Tensor]]


class Replica(Workers):
    """One process training alone: the whole batch, the method's loss as it is."""

    def loss_terms(self, model: nn.Module, method: ContinualMethod, context: TaskContext) -> LossTerms:
        return lambda batch: method.loss_terms(model, batch, context)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def begin_steps(self, seed: int) -> None:
        """Called once the task is set up, before its first step (see the data-parallel one)."""
