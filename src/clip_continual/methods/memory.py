"""Replay memories: exemplars of earlier tasks kept as plain arrays (so they are stored between
tasks without pickle and a resumed run replays exactly the same images), deterministic replay
batches, herding, and CLIP's contrastive loss on image-text pairs.

Plain numpy and PyTorch; no Kedro import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.data.loading import TaskImages
from clip_continual.methods.base import image_features, text_features_together

_STREAM_REPLAY = 11  # apart from the loop's batch, augmentation and vocabulary streams


@dataclass(frozen=True)
class Exemplars:
    """Images (uint8 N x H x W x 3) with their global labels and the task that added them."""

    images: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, image_shape: tuple[int, ...] = (0, 0, 3)) -> Exemplars:
        return cls(np.zeros((0, *image_shape), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], image_shape: tuple[int, ...]) -> Exemplars:
        """The memory an earlier task exported (``memory_*`` arrays), or an empty one."""
        if "memory_images" not in state:
            return cls.empty(image_shape)
        memory = cls(np.asarray(state["memory_images"], np.uint8), np.asarray(state["memory_labels"], np.int64),
                     np.asarray(state["memory_tasks"], np.int64))
        if len(memory) and memory.images.shape[1:] != tuple(image_shape):
            raise ValueError(
                f"the stored replay memory holds images of shape {memory.images.shape[1:]}, this "
                f"task's are {tuple(image_shape)}; it belongs to another run"
            )
        return memory

    def to_state(self) -> dict[str, np.ndarray]:
        return {"memory_images": self.images, "memory_labels": self.labels, "memory_tasks": self.tasks}

    def plus(self, other: Exemplars) -> Exemplars:
        return Exemplars(np.concatenate([self.images, other.images]),
                         np.concatenate([self.labels, other.labels]),
                         np.concatenate([self.tasks, other.tasks]))

    def where(self, keep: np.ndarray) -> Exemplars:
        return Exemplars(self.images[keep], self.labels[keep], self.tasks[keep])


def replay_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM_REPLAY, stream, step])


def draw_indices(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``min(size, count)`` distinct indices in ``[0, count)``."""
    return np.sort(rng.choice(count, size=min(size, count), replace=False))


def random_exemplars(images: TaskImages, classes: list[int], per_task: int, task_index: int,
                     rng: np.random.Generator) -> Exemplars:
    """``per_task`` random training images of the given classes (CL-CLIP's Replayed_MST keeps
    250 random pairs of each finished phase), in memory or read from files alike."""
    pool = np.flatnonzero(np.isin(images.labels, classes))
    chosen = pool[draw_indices(len(pool), per_task, rng)]
    return Exemplars(images.gather(chosen, desc="replay memory"), images.labels[chosen].astype(np.int64),
                     np.full(len(chosen), task_index, np.int64))


def herding_order(features: np.ndarray, count: int) -> np.ndarray:
    """iCaRL's herding: greedily pick the rows whose running mean stays closest to the mean of
    all (L2-normalised) rows; returns ``min(count, N)`` row indices in the order picked."""
    features = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    target = features.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(target)
    available = np.ones(len(features), bool)
    for k in range(min(count, len(features))):
        candidates = (running[None, :] + features) / (k + 1)
        distances = np.linalg.norm(target[None, :] - candidates, axis=1)
        distances[~available] = np.inf
        pick = int(np.argmin(distances))
        chosen.append(pick)
        available[pick] = False
        running += features[pick]
    return np.asarray(chosen, dtype=np.int64)


def contrastive_loss(model: nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over paired rows: (CE(image->text) + CE(text->image)) / 2, with the
    model's own scale (CL-CLIP's agem.py reference loss)."""
    image = image_features(model, pixels)
    (text,) = text_features_together(model, tokens)
    logits = model.logit_scale.exp() * image @ text.t()
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
