"""LoRA: a frozen CLIP whose MLP layers learn a low-rank update, trained task after task.

The layers follow ConDU's LoRA variant (zhangzicong518/ConDU ``clip/model_lora.py``): rank 64 on
the two linear layers of every residual block's MLP (``c_fc``, ``c_proj``) in both towers, the
update scaled by ``1 / sqrt(rank)``; attention is left as it is. The low-rank layers are an
adapter kind ("lora") of ``model/adapters.py``, so checkpoints, freezing and evaluation treat
them like any model.

As a sequential baseline one LoRA is added at task 1 and keeps learning in every later task
(not merged into the backbone): the CLIP stays bit-for-bit the pretrained one and all that
changes is a low-rank update of fixed size, as the project's ``rkr`` keeps its rectifiers.

Why not the ``peft`` library: its LoRA wraps open_clip's ``c_fc``/``c_proj`` without trouble,
but ``peft`` requires ``transformers`` and ``accelerate`` and imports ``transformers`` on
``import peft`` (about as long as importing open_clip itself), and it renames each wrapped
layer's weights (``c_fc.base_layer.weight``), so an adapted model's backbone no longer shares
its state-dict keys with the plain CLIP that weight-space operations compare it to. The layer
below keeps those keys and adds only ``lora_A`` / ``lora_B``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.methods.base import MethodConfigError
from clip_continual.methods.ft import FineTuning
from clip_continual.model.adapters import (
    TOWERS_OF_PARTS, AdapterError, add_adapters, register_adapter_kind, tower_transformers,
)

LORA_TARGETS = ("c_fc", "c_proj")  # ConDU clip/model_lora.py:187-189, the MLP of each block
LORA_INIT_STD = 0.01               # ConDU clip/model_lora.py:15 (lora_A ~ N(0, 0.01^2))


class LoRALinear(nn.Linear):
    """``y = W x + b + (B A x) / sqrt(r)``: a ``nn.Linear`` converted in place (``__class__``),
    so its own weight and bias keep their names. A ~ N(0, 0.01^2) as ConDU; B starts at zero
    (ConDU draws it like A), so an adapted model starts exactly at the model it adapts."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.lora_scaling * update


def convert_to_lora(layer: nn.Linear, rank: int) -> LoRALinear:
    if type(layer) is not nn.Linear:
        raise AdapterError(f"LoRA adapts nn.Linear layers, not {type(layer).__name__}")
    if not 1 <= rank <= min(layer.in_features, layer.out_features):
        raise AdapterError(f"LoRA rank {rank} must lie in [1, {min(layer.in_features, layer.out_features)}] "
                           f"for a {layer.in_features} -> {layer.out_features} layer")
    like = layer.weight
    layer.__class__ = LoRALinear
    layer.lora_A = nn.Parameter(torch.randn(rank, layer.in_features, device=like.device, dtype=like.dtype)
                                * LORA_INIT_STD)
    layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, device=like.device, dtype=like.dtype))
    layer.lora_scaling = rank ** -0.5  # ConDU clip/model_lora.py:17
    return layer


def add_lora(model: nn.Module, recipe: dict[str, Any]) -> None:
    """LoRA on ``c_fc`` and ``c_proj`` of every block's MLP in the recipe's towers."""
    rank = int(recipe["rank"])
    for transformer in tower_transformers(model, recipe["towers"]).values():
        for block in transformer.resblocks:
            mlp = getattr(block, "mlp", None)
            if mlp is None or not all(hasattr(mlp, name) for name in LORA_TARGETS):
                raise AdapterError("LoRA needs open_clip residual blocks with an MLP of c_fc and c_proj")
            for name in LORA_TARGETS:
                convert_to_lora(getattr(mlp, name), rank)


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    return [p for module in transformer.modules() if isinstance(module, LoRALinear)
            for p in (module.lora_A, module.lora_B)]


register_adapter_kind("lora", add_lora, lora_parameters)


def check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MethodConfigError(f"rank must be a positive integer, got {rank!r}")
    return rank


class SequentialLoRA(FineTuning):
    """``L = CE`` as ``ft`` (label smoothing 0.2, ConDU scripts/MTIL_LoRA.sh ``--ls 0.2``),
    trained only through LoRA: ``c_fc`` and ``c_proj`` of every block's MLP in the adapted towers
    compute ``W x + b + (B A x) / sqrt(rank)``, W and b frozen. One LoRA, added at task 1, keeps
    learning task after task."""

    name = "lora"

    def __init__(self, rank: int = 64, label_smoothing: float = 0.2) -> None:
        # rank: ConDU clip/model_lora.py (lora_rank=64 in every block)
        super().__init__(label_smoothing=label_smoothing)
        self.rank = check_rank(rank)

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {"kind": "lora", "rank": self.rank, "towers": TOWERS_OF_PARTS[parts]})
