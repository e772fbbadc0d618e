"""Speed switches of the training loop (``TrainingConfig``: tf32, compile, channels_last,
compile_backend, activation_checkpointing; ``fused`` lives in ``schedule.build_optimizer``). None changes what
a step computes beyond floating-point rounding; each is undone when the task ends, so the
trained model handed back is a plain module (copyable, saveable, evaluated as usual).

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from clip_continual.training.config import TrainingConfig, TrainingConfigError


@contextlib.contextmanager
def training_speed(model: nn.Module, config: TrainingConfig, device: torch.device) -> Iterator[None]:
    """The student ``model`` (and the process's matmul precision) set up for speed while the
    task trains, restored afterwards."""
    undo: list = []
    try:
        if config.tf32 and device.type == "cuda":  # TF32 exists on CUDA only: a no-op elsewhere
            undo.append(_use_tf32())
        if config.channels_last:
            undo.append(_channels_last(model))
        if config.activation_checkpointing:
            undo.append(_checkpointing(model))
        if config.compile:
            undo.append(_compiled(model, config.compile_backend))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def channels_last_pixels(pixels: torch.Tensor | None, config: TrainingConfig) -> torch.Tensor | None:
    """A batch's images in the memory format of the image tower."""
    if pixels is None or not config.channels_last or pixels.dim() != 4:
        return pixels
    return pixels.contiguous(memory_format=torch.channels_last)


def _use_tf32():
    matmul = torch.get_float32_matmul_precision()
    convolutions = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")  # "high": TF32 matmuls on Ampere and later
    torch.backends.cudnn.allow_tf32 = True

    def restore() -> None:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = convolutions
    return restore


def _channels_last(model: nn.Module):
    """The image tower's 4-d weights (the patch embedding) in channels-last order."""
    tower = model.visual
    tower.to(memory_format=torch.channels_last)
    return lambda: tower.to(memory_format=torch.contiguous_format)


def _checkpointing(model: nn.Module):
    """open_clip's activation checkpointing of both towers' blocks: their activations are
    recomputed in backward instead of kept, trading time for memory on large towers."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise TrainingConfigError(
            f"activation_checkpointing needs an open_clip CLIP model with set_grad_checkpointing; "
            f"{type(model).__name__} has none: set continual_learning.training.activation_checkpointing=false"
        )
    model.set_grad_checkpointing(True)
    return lambda: model.set_grad_checkpointing(False)


def _compiled(model: nn.Module, backend: str):
    """``torch.compile`` of what a training step runs most: the image tower and each block of the
    text tower (``model.clip.encode_text`` walks the blocks itself), in place
    (``nn.Module.compile``)."""
    modules = [model.visual, *getattr(getattr(model, "transformer", None), "resblocks", [])]
    for module in modules:
        module.compile(backend=backend)

    def restore() -> None:
        for module in modules:
            module._compiled_call_impl = None  # what nn.Module.compile set: back to the plain call
    return restore
