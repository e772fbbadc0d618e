"""How to fine-tune one task: ``TrainingConfig`` (the paper's defaults) and its checks, which
name the bad setting and its allowed values.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from clip_continual.methods import ContinualMethod, MethodConfigError, get_method
from clip_continual.model.clip import TRAINABLE_PARTS

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
AUGMENTATIONS = ("none", "crop_flip", "zscl")
TEACHERS = ("pretrained", "previous")
# torch.compile backends: inductor generates kernels (the fast one); aot_eager and eager only
# trace (checks that a model compiles, in seconds rather than a minute on CPU).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
_SWITCHES = ("tf32", "compile", "channels_last", "activation_checkpointing")

_FLOAT_FIELDS = ("alpha", "lr", "weight_decay", "eps", "epochs", "lr_gamma", "grad_clip_norm", "final_lr_ratio")


class TrainingConfigError(ValueError):
    """A training parameter is unknown or invalid."""


@dataclass(frozen=True)
class TrainingConfig:
    """How to fine-tune one task. Defaults are the paper's (Adam, lr 1e-6, batch 100, 15 epochs,
    clip 1.0, seed 10). ``steps`` and ``epochs`` may both be set: the run stops at whichever
    comes first (handy to cap a long run). ``lr_milestones`` are in epochs and only apply to
    ``schedule: step`` (paper OST: lr x0.1 after epoch 10 of 15). ``schedule: cosine`` decays to 0
    over the task after ``warmup_steps`` of linear warm-up (ZSCL's); to ``final_lr_ratio`` x lr
    where that is set (DIKI's 1e-3). ``optimizer``: adam, adamw, or sgd (plain, no momentum:
    DIKI's and DPW's; ``betas`` and ``eps`` unused). ``train_logit_scale: false``
    keeps CLIP's temperature fixed (ZSCL). ``augment``: none, crop_flip (the paper's resize 256,
    random crop 224, flip) or zscl (ZSCL's random resized crop, scale 0.9-1). ``alpha`` and
    ``method_options`` are the method's hyper-parameters; None/absent keeps its default.
    ``teacher`` says which model the caller hands in as teacher; with "previous" and no teacher
    given, the start model itself is the teacher.

    Speed switches (README, "Speed switches"), none changing the results beyond rounding:
    ``tf32`` TF32 matmuls and convolutions in fp32 work on CUDA (off: PyTorch's own default; a
    no-op elsewhere); ``compile`` torch.compile of the student's towers with
    ``compile_backend`` (one of ``COMPILE_BACKENDS``); ``channels_last`` images and the image
    tower in channels-last memory order; ``fused`` Adam/AdamW's fused kernel (null: where every
    trainable parameter is a float on CPU or CUDA; false: the multi-tensor foreach kernel);
    ``activation_checkpointing`` open_clip's ``set_grad_checkpointing`` (less memory, more time).
    """

    method: str = "ft"
    alpha: float | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)
    teacher: str = "previous"
    optimizer: str = "adam"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 100
    steps: int | None = None
    epochs: float | None = 15
    schedule: str = "constant"
    lr_milestones: tuple[float, ...] = (10,)
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    train_logit_scale: bool = True
    grad_clip_norm: float | None = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 10
    parts: str = "wm"
    augment: str = "none"
    progress: bool = True
    log_every: int = 50
    tf32: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False
    fused: bool | None = None
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method_options", dict(self.method_options or {}))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in self.lr_milestones))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_choice("parts", self.parts, TRAINABLE_PARTS)
        check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("teacher", self.teacher, TEACHERS)
        self._check_speed_switches()
        _positive("lr", self.lr)
        _positive("eps", self.eps)
        _positive("lr_gamma", self.lr_gamma)
        if not self.weight_decay >= 0:
            raise TrainingConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainingConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise TrainingConfigError(f"final_lr_ratio must lie in [0, 1], got {self.final_lr_ratio}")
        _positive_int("batch_size", self.batch_size)
        _positive_int("log_every", self.log_every)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise TrainingConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TrainingConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.steps is None and self.epochs is None:
            raise TrainingConfigError("give the training length: 'steps' (iterations) and/or 'epochs'")
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        if any(m < 0 for m in self.lr_milestones):
            raise TrainingConfigError(f"lr_milestones must be >= 0 epochs, got {self.lr_milestones}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise TrainingConfigError(
                f"grad_clip_norm must be positive or null (no clipping), got {self.grad_clip_norm}"
            )
        try:
            self.build_method()
        except MethodConfigError as error:
            raise TrainingConfigError(str(error)) from error

    def _check_speed_switches(self) -> None:
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise TrainingConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TrainingConfigError(f"fused must be true, false or null (where possible), got {self.fused!r}")
        check_choice("compile_backend", self.compile_backend, COMPILE_BACKENDS)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> TrainingConfig:
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TrainingConfigError(
                f"unknown training parameter(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        for name in _FLOAT_FIELDS:
            # YAML 1.1 reads '1e-6' (no dot) as a string.
            if isinstance(params.get(name), str):
                try:
                    params[name] = float(params[name])
                except ValueError:
                    raise TrainingConfigError(f"{name} must be a number, got {params[name]!r}") from None
        try:
            return cls(**params)
        except TypeError as error:  # e.g. a string where a list of numbers belongs
            raise TrainingConfigError(f"invalid training parameters: {error}") from error

    def build_method(self) -> ContinualMethod:
        return get_method(self.method, alpha=self.alpha, **self.method_options)

    def to_params(self) -> dict[str, Any]:
        """Plain values, e.g. to log as run parameters."""
        return {
            f.name: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise TrainingConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise TrainingConfigError(f"{name} must be a positive, finite number, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainingConfigError(f"{name} must be a positive integer, got {value!r}")
