"""DIKI: Distribution-aware Interference-free Knowledge Integration (Tang et al., ECCV 2024).

Follows lloongx/DIKI: clip/attention.py (the prefix pool and the fully residual prefix branch of
``multi_head_attention_forward``), clip/model.py (prefixes in the first ``prompt_depth`` blocks of
both towers), DIKI/DIKI.py (``CustomCLIP.forward``: Gaussian task choice, batch vote, calibrated
weights; ``train_one_task``: the task's Gaussian before training, then cross-entropy through the
task's slot) and configs/MTIL.yaml (depth 8, 8 prefixes, batch-wise choice). The slots, the
branch and the Gaussians are the adapter kind "diki" of ``model/adapters.py`` on the shared
machinery of ``model/prefix_attention.py``.

Not taken over: DIKI keeps the epoch with the best accuracy on a validation split
(``use_validation: True``, DIKI.py:414-432); the loop here trains the task's full schedule and
keeps the last step (the protocol difference the README names).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.methods.base import MethodConfigError, TaskContext
from clip_continual.methods.ft import FineTuning
from clip_continual.model.adapters import (
    TOWERS_OF_PARTS, adapter_recipe, add_adapters, register_adapter_kind,
)
from clip_continual.model.prefix_attention import (
    PrefixBranch, PrefixRoute, add_prefix_branches, add_slot, add_task_selector, configure_selector,
    fit_task_gaussian, latest_slot_parameters, merge_heads, per_sequence, queries, slot_rows, split_heads,
)


class KeyValuePrefix(PrefixBranch):
    """DIKI's branch: ``softmax(q K_t^T / sqrt(d)) V_t`` per head over the slot's own ``length``
    keys and values (a softmax apart from the frozen one, no mask), times the route's weight.
    A slot starts with keys U(-1, 1) and values 0 (clip/attention.py:170-173), so the branch
    is 0 and the model the frozen CLIP until the values learn."""

    def __init__(self, width: int, heads: int, length: int, slots: int = 0) -> None:
        super().__init__()
        self.width, self.heads, self.length = width, heads, length
        self.slots = nn.ParameterList()
        for _ in range(slots):
            self._append()

    @property
    def slot_count(self) -> int:
        return len(self.slots)

    def _append(self, like: torch.Tensor | None = None) -> None:
        prefix = torch.zeros(2, self.length, self.width, device=None if like is None else like.device,
                             dtype=None if like is None else like.dtype)
        with torch.no_grad():
            prefix[0].uniform_(-1.0, 1.0)
        self.slots.append(nn.Parameter(prefix))

    def add_slot(self, attn: nn.MultiheadAttention, **options: Any) -> None:
        self._append(attn.in_proj_weight)

    def latest_parameters(self) -> list[nn.Parameter]:
        return [self.slots[-1]] if len(self.slots) else []

    def branch(self, tokens: torch.Tensor, attn: nn.MultiheadAttention, route: PrefixRoute) -> torch.Tensor:
        count = len(tokens)
        prefix = slot_rows(torch.stack(list(self.slots)), route.slots, count).to(tokens.dtype)
        q = split_heads(queries(tokens, attn), self.heads)
        keys, values = (split_heads(prefix[:, part], self.heads) for part in (0, 1))
        out = F.scaled_dot_product_attention(q, keys, values)
        if route.weights is not None:
            out = out * per_sequence(route.weights, count, out)
        return merge_heads(out)


# Recipe entries that may change between tasks (counts, evaluation settings).
SETTINGS = ("slots", "tasks", "batchwise", "vote_batch", "likelihood_scale")


def add_diki(model: nn.Module, recipe: dict[str, Any]) -> None:
    length, slots = int(recipe["length"]), int(recipe.get("slots", 0))
    add_prefix_branches(model, recipe["towers"], int(recipe["depth"]),
                        lambda attn, tower: KeyValuePrefix(attn.embed_dim, attn.num_heads, length, slots))
    add_task_selector(model, recipe)


register_adapter_kind("diki", add_diki, latest_slot_parameters, settings=SETTINGS)


def task_images(task: TaskContext) -> tuple[Any, Any]:
    """The task's training images and their preprocessing, which the task Gaussian reads."""
    if task.train_images is None or task.preprocess is None:
        raise ValueError("this method needs the task's training images in TaskContext")
    return task.train_images, task.preprocess


class DIKI(FineTuning):
    """``L = CE`` as ``ft`` through the task's prefix slot; the CLIP itself stays frozen.

    ``depth`` blocks of each tower trained (``parts``: wm both, as DIKI) get a residual
    prefix branch with ``length`` keys and values per task. Before a task, the Gaussian of its
    training images' frozen-CLIP features is stored with the model; at evaluation each test
    image takes the slot of its most likely task (``batchwise``: the most frequent choice of its
    batch of ``vote_batch`` images), weighted by ``sigmoid(log p / likelihood_scale - 1)``
    (null: the feature width, DIKI's 512 for ViT-B/16).
    """

    name = "diki"

    def __init__(
        self,
        depth: int = 8,                  # configs/MTIL.yaml:17-18 (prompt_depth_vision / _text)
        length: int = 8,                 # configs/MTIL.yaml:19-20 (n_ctx_vision / _text)
        batchwise: bool = True,          # configs/MTIL.yaml:21 (batchwise_prompt)
        vote_batch: int = 256,           # DIKI.py:475-477: test batch = 2 x batch_size 128
        likelihood_scale: float | None = None,  # DIKI.py:171 (/512); null: the feature width
        label_smoothing: float = 0.0,    # DIKI.py:391 plain F.cross_entropy
    ) -> None:
        super().__init__(label_smoothing=label_smoothing)
        for key, value in (("depth", depth), ("length", length), ("vote_batch", vote_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodConfigError(f"{key} must be a positive integer, got {value!r}")
        if likelihood_scale is not None and not float(likelihood_scale) > 0:
            raise MethodConfigError(f"likelihood_scale must be positive or null, got {likelihood_scale!r}")
        self.depth, self.length, self.batchwise, self.vote_batch = depth, length, bool(batchwise), vote_batch
        self.likelihood_scale = None if likelihood_scale is None else float(likelihood_scale)

    def _settings(self) -> dict[str, Any]:
        return {"batchwise": self.batchwise, "vote_batch": self.vote_batch,
                "likelihood_scale": self.likelihood_scale}

    def adapt(self, student: nn.Module, recipe: dict[str, Any]) -> dict[str, Any]:
        """Add the adapters of ``recipe`` (kind and structure) with this run's settings; a
        continued model keeps its slots and Gaussians and takes the settings."""
        add_adapters(student, {**recipe, "slots": 0, "tasks": 0, **self._settings()})
        recipe = adapter_recipe(student)
        recipe.update(self._settings())
        configure_selector(student.visual.task_selector, recipe)
        return recipe

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        recipe = self.adapt(student, {"kind": "diki", "depth": self.depth, "length": self.length,
                                      "towers": TOWERS_OF_PARTS[parts]})
        add_slot(student)
        recipe["slots"] += 1

    def prepare_for_task(self, student: nn.Module, task: TaskContext) -> None:
        fit_task_gaussian(student, *task_images(task))
