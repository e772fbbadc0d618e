"""What a task's training costs, measured by the loop: the peak memory, the passes through the
image encoder per step, the images seen, device-hours, the parameters stored and what the
method keeps beside them (``ContinualMethod.extra_storage_bytes``).

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_continual.training.schedule import global_batch_size

MIB = 2**20
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class PeakMemory:
    """The most memory the task used: on a GPU the bytes torch allocated on it
    (``max_memory_allocated``), elsewhere the process's peak resident set. Linux lets a process
    reset its peak resident set (``echo 5 > /proc/self/clear_refs``), so each task is measured
    alone; where it cannot be reset, the peak since the process started is all there is."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _reset_peak_resident_set()

    def mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return _peak_resident_set() / MIB


def _reset_peak_resident_set() -> None:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not allowed: the peak since the process started
        pass


def _peak_resident_set() -> int:
    """VmHWM of /proc/self/status (which clear_refs resets), else getrusage's ru_maxrss."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PassCounter:
    """Counts, while installed, the batches of images passed forward through the student's and
    the teacher's image encoders and backward through the student's (the encoder whose cost a
    step is made of: a replayed or reference batch is one more pass). Backward passes are
    counted at the text encoder's output instead when the image encoder does not train. Hooks
    only count: they change no value and no gradient."""

    def __init__(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        self.forward = self.teacher_forward = self.backward = 0
        image_trains = any(p.requires_grad for p in _image_encoder(student).parameters())
        self._handles = [_image_encoder(student).register_forward_hook(self._student_forward)]
        if not image_trains and hasattr(student, "ln_final"):  # CLIP's text features end there
            self._handles.append(student.ln_final.register_forward_hook(self._watch_backward))
        for teacher in {id(t): t for t in teachers if t is not student}.values():
            self._handles.append(_image_encoder(teacher).register_forward_hook(self._teacher_forward))
        self._watch_image_backward = image_trains

    def _student_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.forward += 1
        if self._watch_image_backward:
            self._watch_backward(module, inputs, output)

    def _teacher_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.teacher_forward += 1

    def _watch_backward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._count_backward)

    def _count_backward(self, gradient: torch.Tensor) -> None:
        self.backward += 1

    def per_step(self, steps: int) -> dict[str, float]:
        steps = max(steps, 1)
        return {"forward_passes_per_step": self.forward / steps,
                "teacher_forward_passes_per_step": self.teacher_forward / steps,
                "backward_passes_per_step": self.backward / steps}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _image_encoder(model: nn.Module) -> nn.Module:
    return getattr(model, "visual", model)


def teacher_models(context: Any) -> list[nn.Module]:
    """The frozen models a method may read: its teacher and the zero-shot model (ZSCL's)."""
    zero_shot = context.extras.get("pretrained_model")
    return ([context.teacher.model] if context.teacher is not None else []) + (
        [zero_shot.model] if zero_shot is not None else [])


def measured_costs(plan: Any, passes: PassCounter, memory: PeakMemory, world_size: int,
                   wall_time_s: float) -> dict[str, float]:
    """The images the task drew (its global batches), device-hours (every replica's device for
    the task's wall time; a CPU process counts as one), the peak memory (of this process's
    device) and the passes per step."""
    return {"images_seen": sum(global_batch_size(plan, step) for step in range(plan.total_steps)),
            "device_hours": wall_time_s * world_size / 3600,
            "peak_memory_mib": memory.mib(),
            **passes.per_step(plan.total_steps)}


def stored_costs(method: Any, context: Any, student: nn.Module) -> dict[str, Any]:
    """The parameters of the model the task hands on and what the method keeps beside them."""
    kept = {kind: int(size) for kind, size in method.extra_storage_bytes(context, student).items()}
    return {"stored_parameters": sum(p.numel() for p in student.parameters()),
            "extra_storage": kept,
            "extra_storage_mib": sum(kept.values()) / MIB}
