"""RKR: a frozen CLIP whose linear layers learn a low-rank rectification and a scale.

Follows the code of our paper, CL-CLIP ``models/clip_rkr.py`` (``inject_trainable_rkr``,
``LoraInjectedLinear``) and ``main.py`` (which towers for which part; the backbone frozen), trained
with the fine-tuning loss of ``methods/ft.py``. The rectifiers are an adapter kind ("rkr") of
``model/adapters.py``, so checkpoints, freezing and evaluation treat them like any model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from clip_continual.methods.base import MethodConfigError, TaskContext, tensor_bytes
from clip_continual.methods.ft import FineTuning
from clip_continual.model.adapters import (
    TOWERS_OF_PARTS, AdapterError, add_adapters, register_adapter_kind, tower_transformers,
)


class Rectifier(nn.Module):
    """The weight parametrization ``W -> diag(s) (W + U D)`` of one linear layer.

    CL-CLIP (models/clip_rkr.py, LoraInjectedLinear) computes ``(W x + b + U D x) * s``: a
    rank-r branch ``U D`` beside the frozen layer and a per-output-channel scale ``s`` of the
    sum. As a parametrization the same numbers reach every caller of ``weight``, including
    ``nn.MultiheadAttention``, which reads ``out_proj.weight`` rather than calling the layer.
    Initialisation as CL-CLIP: D zeros (so the branch starts at zero), U as ``nn.Linear(r,
    out)``'s default, s ones; CL-CLIP injects with dropout 0.
    """

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(out_features, in_features):
            raise AdapterError(
                f"RKR rank {rank} must lie in [1, {min(out_features, in_features)}] for a "
                f"{in_features} -> {out_features} layer"
            )
        self.down = nn.Parameter(torch.zeros(rank, in_features))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale.unsqueeze(1) * (weight + self.up @ self.down)


class _ScaledBias(nn.Module):
    """The bias parametrization ``b -> s * b`` with the scale of the layer's ``Rectifier``
    (held outside the module tree, so the scale is stored and trained once)."""

    def __init__(self, rectifier: Rectifier) -> None:
        super().__init__()
        self.__dict__["rectifier"] = rectifier

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return self.rectifier.scale * bias


def add_rectifiers(model: nn.Module, recipe: dict[str, Any]) -> None:
    # CL-CLIP adapts every nn.Linear inside the residual blocks (attention output, MLP in and
    # out); the fused q/k/v projection of CLIP's attention is a raw parameter, left frozen there.
    rank = int(recipe["rank"])
    for transformer in tower_transformers(model, recipe["towers"]).values():
        linears = [m for m in transformer.modules() if isinstance(m, nn.Linear)]
        for layer in linears:
            rectifier = Rectifier(layer.out_features, layer.in_features, rank).to(layer.weight)
            parametrize.register_parametrization(layer, "weight", rectifier)
            if layer.bias is not None:
                parametrize.register_parametrization(layer, "bias", _ScaledBias(rectifier))


def rectifier_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    return [p for module in transformer.modules() if isinstance(module, Rectifier) for p in module.parameters()]


register_adapter_kind("rkr", add_rectifiers, rectifier_parameters)


class RectifiedKnowledgeRetention(FineTuning):
    """``L = CE`` as ``ft``, trained only through rectifiers: every ``nn.Linear`` of the residual
    blocks of the adapted towers computes ``(W x + b + U D x) * s`` with W, b frozen,
    rank-``rank`` U, D and a per-output-channel scale s. The rectifiers are added once (task 1)
    and keep learning in later tasks, as CL-CLIP resumes them.
    """

    name = "rkr"

    def __init__(self, rank: int = 4, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MethodConfigError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {"kind": "rkr", "rank": self.rank, "towers": TOWERS_OF_PARTS[parts]})

    def extra_storage_bytes(self, task: TaskContext, student: nn.Module) -> dict[str, int]:
        """The rectifiers added to the architecture, kept with the model."""
        rectifiers = [p for module in student.modules() if isinstance(module, Rectifier) for p in module.parameters()]
        return super().extra_storage_bytes(task, student) | {"adapters": tensor_bytes(rectifiers)}
