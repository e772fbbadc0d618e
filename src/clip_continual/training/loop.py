"""The one training loop every continual-learning method runs through.

The loop owns devices, precision, the optimizer and its schedule, clipping, seeds, batching,
augmentation, progress and logging; a method (see ``clip_continual.methods``) only turns a batch
into named loss terms. Everything that varies with the step (batch order, augmentation, the
replayed vocabulary, the learning rate) is a pure function of ``(seed, task_index, step)``, so a
step can be recomputed exactly.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import (
    InMemoryImages, LazyImages, LoaderConfig, TaskImages, TrainBatch, TrainingSource, random_resized_box,
    training_source,
)
from clip_continual.methods import ContinualMethod, MethodConfigError, get_method
from clip_continual.methods.base import Batch, TaskContext, Teacher, evaluation_mode
from clip_continual.model.clip import (
    TRAINABLE_PARTS, ClipModel, preprocess_images, resolve_device, set_trainable_parts,
)
from clip_continual.methods.vocabulary import ReplayVocabulary, derive_seed

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
AUGMENTATIONS = ("none", "crop_flip", "zscl")
TEACHERS = ("pretrained", "previous")
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip's clamp: a temperature of at least 1/100
CROP_RESIZE_RATIO = 256 / 224  # the paper's train transform: resize 256, random crop 224
MIN_PRECOMPUTE_BATCH = 256

_FLOAT_FIELDS = ("alpha", "lr", "weight_decay", "eps", "epochs", "lr_gamma", "grad_clip_norm")
_STREAM_AUGMENT = 3  # keeps augmentation randomness apart from the vocabulary's streams


class TrainingConfigError(ValueError):
    """A training parameter is unknown or invalid."""


@dataclass(frozen=True)
class TrainingConfig:
    """How to fine-tune one task. Defaults are the paper's (Adam, lr 1e-6, batch 100, 15 epochs,
    clip 1.0, seed 10). ``steps`` and ``epochs`` may both be set: the run stops at whichever
    comes first (handy to cap a long run). ``lr_milestones`` are in epochs and only apply to
    ``schedule: step`` (paper OST: lr x0.1 after epoch 10 of 15). ``schedule: cosine`` decays to 0
    over the task after ``warmup_steps`` of linear warm-up (ZSCL's). ``train_logit_scale: false``
    keeps CLIP's temperature fixed (ZSCL). ``augment``: none, crop_flip (the paper's resize 256,
    random crop 224, flip) or zscl (ZSCL's random resized crop, scale 0.9-1). ``alpha`` and
    ``method_options`` are the method's hyper-parameters; None/absent keeps its default.
    ``teacher`` says which model the caller hands in as teacher; with "previous" and no teacher
    given, the start model itself is the teacher.
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
    train_logit_scale: bool = True
    grad_clip_norm: float | None = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 10
    parts: str = "wm"
    augment: str = "none"
    progress: bool = True
    log_every: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "method_options", dict(self.method_options or {}))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in self.lr_milestones))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _choice("parts", self.parts, TRAINABLE_PARTS)
        _choice("augment", self.augment, AUGMENTATIONS)
        _choice("teacher", self.teacher, TEACHERS)
        _positive("lr", self.lr)
        _positive("eps", self.eps)
        _positive("lr_gamma", self.lr_gamma)
        if not self.weight_decay >= 0:
            raise TrainingConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainingConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
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


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise TrainingConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise TrainingConfigError(f"{name} must be a positive, finite number, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainingConfigError(f"{name} must be a positive integer, got {value!r}")


# --- pure functions of the step -----------------------------------------------------------

def learning_rate_at(
    step: int, base_lr: float, schedule: str = "constant",
    milestone_steps: Sequence[int] = (), gamma: float = 0.1,
    warmup_steps: int = 0, total_steps: int | None = None,
) -> float:
    """The learning rate of (0-based) ``step``: constant, times ``gamma`` at each milestone
    already reached, or cosine. The first ``warmup_steps`` rise linearly to ``base_lr``. A
    function of the step alone, so a resumed run gets the same rates."""
    if step < warmup_steps:  # ZSCL mtil/src/utils.py _warmup_lr: base_lr * (step + 1) / warmup
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":  # ZSCL mtil/src/utils.py cosine_lr, to 0 at total_steps
        if total_steps is None:
            raise TrainingConfigError("the cosine schedule needs the task's total number of steps")
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr
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
                            config.warmup_steps, plan.total_steps)


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


def augment_crop_flip(
    images: np.ndarray, clip: ClipModel, generator: torch.Generator, device: torch.device,
    part: slice | None = None, global_count: int | None = None,
) -> torch.Tensor:
    """The paper's train transform at the model's resolution S: resize to S * 256/224, random
    S x S crop, random horizontal flip (per image, from ``generator``). When ``images`` are
    ``part`` of a global batch of ``global_count`` images, the draws are the global batch's, so
    every image gets the crop it gets in a one-process run."""
    size = clip.image_size
    resized = max(size, round(size * CROP_RESIZE_RATIO))
    big = preprocess_images(images, resized, clip.image_mean, clip.image_std, device)
    count = len(images) if global_count is None else global_count
    part = part or slice(0, count)
    offsets = torch.randint(0, resized - size + 1, (count, 2), generator=generator)[part].tolist()
    flips = (torch.rand(count, generator=generator) < 0.5)[part].tolist()
    crops = []
    for image, (top, left), flip in zip(big, offsets, flips):
        crop = image[:, top : top + size, left : left + size]
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)


def _diverged(values: dict[str, float], step: int, task_index: int, precision: str) -> str:
    advice = "lower continual_learning.training.lr"
    if precision != "fp32":  # fp32 is only advice where training is not already in fp32
        advice += " or set continual_learning.training.precision=fp32"
    return f"the loss became {values['loss']} at step {step + 1} of task {task_index} ({values}); {advice}"


def augment_zscl(
    images: np.ndarray, clip: ClipModel, generator: torch.Generator, device: torch.device,
    part: slice | None = None, global_count: int | None = None,
) -> torch.Tensor:
    """ZSCL's train transform (mtil/clip/clip.py ``_transform(n_px, is_train=True)``):
    RandomResizedCrop(S, scale=(0.9, 1.0), bicubic), per image, drawn from ``generator``.
    Each image's box comes from its position in the global batch (``part`` of ``global_count``
    images), so a data-parallel replica crops every image as a one-process run does."""
    size = clip.image_size
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    positions = range(len(images) if global_count is None else global_count)[part or slice(None)]
    crops = []
    for image, position in zip(images, positions):
        rng = np.random.default_rng((base, position))
        top, left, height, width = random_resized_box(image.shape[0], image.shape[1], rng)
        crops.append(image[top:top + height, left:left + width])
    return torch.cat([preprocess_images(crop[None], size, clip.image_mean, clip.image_std, device)
                      for crop in crops])


# --- devices and precision ----------------------------------------------------------------

def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 off CUDA; on CUDA 'auto' is bf16 where supported, else fp16 (with a GradScaler)."""
    _choice("precision", requested, PRECISIONS)
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
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    # The fused kernel halves a whole-model step on CPU (6.9 M parameters, mostly the token
    # embedding): benchmarks/step_time.py, ft 141.8 -> 70.3 ms (README).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return kind(parameters, lr=config.lr, betas=config.betas, eps=config.eps,
                weight_decay=config.weight_decay, fused=fused)


# --- data parallelism: the extension point clip_continual.distributed fills -------------

class Replica:
    """The training loop's view of data parallelism; this base is one process training alone.

    A data-parallel replica (``clip_continual.distributed``) trains ``part`` of every global
    batch, computes the loss terms through ``forward`` (a ``DistributedDataParallel`` wrapper
    that averages gradients across replicas in backward) and ``reduce``s logged numbers to the
    global batch's.
    """

    rank = 0
    world_size = 1

    def part(self, global_size: int) -> slice:
        return slice(0, global_size)

    def forward(self, task: _Task, method: ContinualMethod) -> Callable[[Batch], dict[str, torch.Tensor]]:
        return lambda batch: method.loss_terms(task.student.model, batch, task.context)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values


def global_batch_size(plan: TrainingPlan, step: int) -> int:
    """The size of step ``step``'s global batch (the last batch of an epoch may be short)."""
    position = step % plan.steps_per_epoch
    return min(plan.batch_size, plan.num_images - position * plan.batch_size)


# --- the loop -----------------------------------------------------------------------------

def _class_ids(name: str, classes: Sequence[int] | None, default: list[int]) -> list[int]:
    if classes is None:
        return default
    ids = sorted({int(c) for c in classes})
    if not ids:
        raise ValueError(f"{name} is empty")
    return ids


def _same_device(first: torch.device, second: torch.device) -> bool:
    """'cuda' and 'cuda:0' are the same device when 0 is the current one."""
    def canonical(device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device
    return canonical(first) == canonical(second)


def _prepare_teacher(
    method: ContinualMethod, start: ClipModel, teacher: ClipModel | None,
    config: TrainingConfig, device: torch.device,
) -> ClipModel | None:
    if not method.needs_teacher:
        return None
    if teacher is None:
        if config.teacher == "pretrained":
            raise ValueError(
                f"method '{method.name}' with teacher 'pretrained' needs the pretrained model "
                f"passed as `teacher`"
            )
        teacher = start  # teacher 'previous': the model this task starts from
    if teacher.context_length != start.context_length:
        raise ValueError(
            f"teacher context length {teacher.context_length} differs from the student's "
            f"{start.context_length}; teacher and student must share an architecture"
        )
    if not _same_device(teacher.device, device):
        # Moving the caller's model would change it; a private copy goes to the device instead.
        teacher = teacher.clone()
        teacher.model.to(device)
    return teacher


@dataclass
class _Task:
    """What one task's steps share: the student, its trainable parameters, the method's task
    context, optimizer and scaler, and the batches in order."""

    student: ClipModel
    trainable: list[torch.nn.Parameter]
    context: TaskContext
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plan: TrainingPlan
    device: torch.device
    precision: str
    setup_time: float = 0.0
    replica: Replica = field(default_factory=Replica)
    forward: Callable[[Batch], dict[str, torch.Tensor]] | None = None


def _checked_classes(
    source: TrainingSource, class_prompts: Sequence[str], current_classes: Sequence[int] | None,
    seen_classes: Sequence[int] | None,
) -> tuple[list[int], list[int]]:
    if len(class_prompts) != len(source.class_names):
        raise ValueError(
            f"{len(class_prompts)} class prompts for {len(source.class_names)} classes; give "
            f"one prompt per class of the updated task, index = global label"
        )
    current = _class_ids("current_classes", current_classes, list(range(len(class_prompts))))
    seen = _class_ids("seen_classes", seen_classes, current)
    if not set(np.unique(source.labels).tolist()) <= set(current):
        raise ValueError(
            "the training set has labels outside current_classes; restrict it with "
            "restrict_to_classes(current_classes)"
        )
    return current, seen


def _checked_vocabulary(method: ContinualMethod, vocabulary: ReplayVocabulary | None,
                        start: ClipModel) -> ReplayVocabulary | None:
    if not method.needs_vocabulary:
        return None
    if vocabulary is None:
        raise ValueError(
            f"method '{method.name}' needs a replayed vocabulary; build one with "
            f"methods.vocabulary.build_vocabulary(VocabularyConfig(mode='{method.default_vocabulary_mode}'), "
            f"model.context_length)"
        )
    if vocabulary.context_length != start.context_length:
        raise ValueError(
            f"the vocabulary was built for context length {vocabulary.context_length}, the "
            f"model has {start.context_length}; rebuild the vocabulary for this model"
        )
    if vocabulary.config.mode != method.default_vocabulary_mode:
        logger.warning(
            "method '%s' was published with vocabulary mode '%s'; this run replays mode '%s'",
            method.name, method.default_vocabulary_mode, vocabulary.config.mode,
        )
    return vocabulary


def _start_task(
    start: ClipModel, source: TrainingSource, class_prompts: Sequence[str], current: list[int],
    seen: list[int], config: TrainingConfig, method: ContinualMethod,
    vocabulary: ReplayVocabulary | None, teacher: ClipModel | None, task_index: int,
    extras: dict[str, Any], previous_state: dict[str, np.ndarray],
) -> _Task:
    """Devices, precision, the student copy, the teacher and the optimizer of one task."""
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    autocast = autocast_for(precision, device)
    torch.manual_seed(config.seed + task_index)
    student = start.clone()
    student.model.to(device)
    method.prepare_student(student.model, config.parts)
    trainable = set_trainable_parts(student.model, config.parts)
    if not config.train_logit_scale and hasattr(student.model, "logit_scale"):
        # ZSCL mtil/src/models/finetune.py: exclude_params_name = ["logit_scale"]
        student.model.logit_scale.requires_grad_(False)
        trainable = [p for p in trainable if p is not student.model.logit_scale]
    student.model.train()
    teacher_clip = _prepare_teacher(method, start, teacher, config, device)
    plan = plan_training(config, len(source))
    context = TaskContext(
        task_index=task_index,
        device=device,
        class_tokens=student.tokenize(list(class_prompts)).to(device),
        current_classes=torch.tensor(current, device=device),
        seen_classes=torch.tensor(seen, device=device),
        vocabulary=vocabulary,
        teacher=None if teacher_clip is None else Teacher(teacher_clip.model, autocast),
        autocast=autocast,
        seed=config.seed + task_index,
        train_set=source.image_set if isinstance(source, InMemoryImages) else None,
        train_images=TaskImages(source, student, config.progress),
        preprocess=functools.partial(student.preprocess, device=device),
        tokenize=lambda texts: student.tokenize(list(texts)).to(device),
        extras=extras,
        previous_state=previous_state,
    )
    logger.info(
        "task %d: %s %s, %d steps (%d per epoch, batch %d), parts %s (%d trainable parameters), "
        "%s %s", task_index, method.name, method.hyper_parameters(), plan.total_steps,
        plan.steps_per_epoch, plan.batch_size, config.parts, sum(p.numel() for p in trainable),
        device, precision,
    )
    return _Task(student, trainable, context, build_optimizer(trainable, config),
                 torch.amp.GradScaler(device.type, enabled=precision == "fp16"), plan, device, precision)


def _precompute_teacher(task: _Task, source: TrainingSource, config: TrainingConfig,
                        method: ContinualMethod) -> None:
    """The fixed teacher's features of every clean training image, once per task; pays once
    the task shows every image at least once on average."""
    teacher_reads_clean = method.distills_clean_images or config.augment == "none"
    plan = task.plan
    if (task.context.teacher is not None and method.uses_teacher_images and teacher_reads_clean
            and plan.total_steps * plan.batch_size >= plan.num_images):
        batches = source.clean_batches(task.student, max(plan.batch_size, MIN_PRECOMPUTE_BATCH), task.device)
        task.context.teacher.precompute_image_features(
            ((torch.from_numpy(indices).to(task.device), pixels) for indices, pixels in batches),
            plan.num_images,
        )


def _batches(task: _Task, source: TrainingSource, config: TrainingConfig, method: ContinualMethod,
             task_seed: int) -> Iterator[TrainBatch]:
    """The task's batches in the order of ``BatchOrder``: a pure function of (seed, step)."""
    order = BatchOrder(task.plan, task_seed)
    global_indices = [order.indices(step) for step in range(task.plan.total_steps)]
    parts = [task.replica.part(len(batch)) for batch in global_indices]
    indices = [batch[part] for batch, part in zip(global_indices, parts)]  # this replica's share
    augments = config.augment != "none"
    need_clean = augments and method.distills_clean_images
    if isinstance(source, InMemoryImages):
        transform = augment_crop_flip if config.augment == "crop_flip" else augment_zscl

        def augment(step: int, images: np.ndarray) -> torch.Tensor:
            generator = torch.Generator().manual_seed(derive_seed(task_seed, _STREAM_AUGMENT, step))
            return transform(images, task.student, generator, task.device, parts[step],
                             len(global_indices[step]))

        return source.train_batches(task.student, indices, task.device, augment if augments else None,
                                    need_clean)
    return source.train_batches(task.student, indices, task.device, config.augment if augments else False,
                                need_clean, seed=task_seed)


def _optimizer_step(task: _Task, method: ContinualMethod, batch: Batch, lr: float,
                    config: TrainingConfig) -> dict[str, float]:
    """One update; returns the loss terms, their sum ``loss``, as plain numbers."""
    for group in task.optimizer.param_groups:
        group["lr"] = lr
    model = task.student.model
    with task.context.autocast():
        terms = task.forward(batch)
    # Batch-mean terms weighted by this replica's share of the global batch: averaged over
    # replicas (DDP), the gradient is the global batch's. 1 in a one-process run.
    share = len(batch.indices) * task.replica.world_size / global_batch_size(task.plan, batch.step)
    terms = {name: term * share for name, term in terms.items()}
    loss = torch.stack(list(terms.values())).sum()
    task.optimizer.zero_grad(set_to_none=True)
    task.scaler.scale(loss).backward()
    task.scaler.unscale_(task.optimizer)  # a no-op without fp16 loss scaling
    # The method's gradient hook sees unscaled gradients before any clipping (A-GEM projects
    # before clipping, as the paper's agem.py does not clip).
    method.before_optimizer_step(model, batch, task.context)
    if config.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(task.trainable, config.grad_clip_norm)
    task.scaler.step(task.optimizer)
    task.scaler.update()
    if hasattr(model, "logit_scale"):
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
    method.after_optimizer_step(model, batch.step + 1, task.context)
    # One device sync per step: all terms and the total come back together.
    numbers = torch.stack([loss.detach()] + [t.detach() for t in terms.values()]).float()
    numbers = task.replica.reduce(numbers).tolist()
    return dict(zip(["loss", *terms], numbers))


def _train_steps(
    task: _Task, batches: Iterator[TrainBatch], source: TrainingSource, config: TrainingConfig,
    method: ContinualMethod, vocabulary: ReplayVocabulary | None, task_index: int,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> tuple[dict[str, list[float]], list[float]]:
    """The loop over steps; returns every loss term's history and the step times."""
    plan, history, step_times, window = task.plan, {}, [], {}
    progress = tqdm(range(plan.total_steps), desc=f"task {task_index} {method.name}",
                    disable=not config.progress, leave=False)
    started = time.perf_counter()
    for step, train_batch in zip(progress, batches):
        lr = step_learning_rate(config, plan, step)
        batch = _make_batch(step, train_batch, source, vocabulary, task_index, task.device)
        values = _optimizer_step(task, method, batch, lr, config)
        step_times.append(time.perf_counter() - started)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(_diverged(values, step, task_index, task.precision))
        for name, value in values.items():
            history.setdefault(name, []).append(value)
            window.setdefault(name, []).append(value)
        progress.set_postfix({k: f"{np.mean(v):.4f}" for k, v in window.items()}, refresh=False)
        if (step + 1) % config.log_every == 0 or step + 1 == plan.total_steps:
            logger.info("task %d step %d/%d lr %.3g %s", task_index, step + 1, plan.total_steps,
                        lr, {k: round(float(np.mean(v)), 5) for k, v in window.items()})
            window = {}
        if on_step is not None:
            on_step(step + 1, {**values, "lr": lr})
        started = time.perf_counter()  # the next step's time includes waiting for its batch
    progress.close()
    return history, step_times


def fine_tune(
    start: ClipModel,
    train_set: ImageSet | TrainingSource | LazyImages,
    class_prompts: Sequence[str],
    current_classes: Sequence[int] | None = None,
    seen_classes: Sequence[int] | None = None,
    config: TrainingConfig | None = None,
    vocabulary: ReplayVocabulary | None = None,
    teacher: ClipModel | None = None,
    task_index: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    method: ContinualMethod | None = None,
    loader: LoaderConfig | None = None,
    replica: Replica | None = None,
    extras: Mapping[str, Any] | None = None,
    previous_state: Mapping[str, np.ndarray] | None = None,
) -> tuple[ClipModel, dict[str, Any]]:
    """Fine-tune a copy of ``start`` on ``train_set`` and return it with a summary.

    ``train_set`` is an in-memory ``ImageSet`` or a lazy set (a prepared split, an
    ``ImageIndex``) read by DataLoader workers as ``loader`` says. ``class_prompts`` are the
    prompts of ALL classes of the updated task (index = global label); ``current_classes``
    (default: all) are learnt now, ``seen_classes`` (default: the current ones) are all classes
    learnt so far, current included. ``teacher`` is the frozen model the method distils from
    (may be ``start`` itself); it is only read. ``on_step(step, values)`` is called after every
    optimizer step with the 1-based step of this task and the loss terms, their sum ``loss`` and
    the learning rate ``lr``. ``method`` overrides the method named by ``config`` with a ready
    instance (read its ``export_state()`` afterwards). ``extras`` are the named inputs the method
    declares in ``needs_inputs`` (e.g. ``reference_set``); ``previous_state`` the arrays it
    exported after the previous task. ``replica`` is this process's place in a data-parallel run
    (see ``clip_continual.distributed``); default: one process. ``start`` is never modified.
    """
    config = config or TrainingConfig()
    method = method or config.build_method()
    source = training_source(train_set, loader)
    current, seen = _checked_classes(source, class_prompts, current_classes, seen_classes)
    vocabulary = _checked_vocabulary(method, vocabulary, start)
    extras = dict(extras or {})
    missing = [name for name in method.needs_inputs if extras.get(name) is None]
    if missing:
        raise ValueError(f"method '{method.name}' needs the input(s) {missing}; pass them in `extras`")
    wall_started = time.perf_counter()
    task = _start_task(start, source, class_prompts, current, seen, config, method, vocabulary,
                       teacher, task_index, extras, dict(previous_state or {}))
    task.replica = replica or Replica()
    task.forward = task.replica.forward(task, method)
    setup_started = time.perf_counter()
    with evaluation_mode(task.context.teacher.model if task.context.teacher is not None else None):
        _precompute_teacher(task, source, config, method)
        method.before_task(task.context)
        task.setup_time = time.perf_counter() - setup_started
        try:
            batches = _batches(task, source, config, method, config.seed + task_index)
            history, step_times = _train_steps(task, batches, source, config, method, vocabulary,
                                               task_index, on_step)
        finally:
            method.after_task(task.context, task.student.model)
    return _finish(task, method, config, history, step_times, task_index, wall_started)


def _finish(task: _Task, method: ContinualMethod, config: TrainingConfig,
            history: dict[str, list[float]], step_times: list[float], task_index: int,
            wall_started: float) -> tuple[ClipModel, dict[str, Any]]:
    """Hand back a plain model (eval mode, every parameter trainable again, as CLIP loads) and
    the task's summary."""
    student, plan = task.student, task.plan
    student.model.eval()
    for parameter in student.model.parameters():
        parameter.requires_grad_(True)
    summary = {
        "method": method.name,
        "hyper_parameters": method.hyper_parameters(),
        "task_index": task_index,
        "steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "num_images": plan.num_images,
        "batch_size": plan.batch_size,
        "trainable_parameters": sum(p.numel() for p in task.trainable),
        "median_step_time_s": statistics.median(step_times),
        "train_time_s": float(sum(step_times)),
        "setup_time_s": task.setup_time,
        "wall_time_s": time.perf_counter() - wall_started,
        "final_losses": {name: values[-1] for name, values in history.items()},
        "mean_losses": {name: float(np.mean(values)) for name, values in history.items()},
        "final_lr": step_learning_rate(config, plan, plan.total_steps - 1),
        "logit_scale": (float(student.model.logit_scale.detach().exp())
                        if hasattr(student.model, "logit_scale") else None),
        "device": str(task.device),
        "precision": task.precision,
    }
    student.metadata.setdefault("training", []).append(
        {"task_index": task_index, "method": method.name, "steps": plan.total_steps,
         "parts": config.parts, "final_loss": summary["final_losses"]["loss"]}
    )
    return student, summary


def _make_batch(step: int, train_batch: TrainBatch, source: TrainingSource,
                vocabulary: ReplayVocabulary | None, task_index: int, device: torch.device) -> Batch:
    indices = train_batch.indices
    return Batch(
        step=step,
        indices=torch.from_numpy(indices).to(device),
        labels=torch.from_numpy(source.labels[indices]).long().to(device),
        pixels=train_batch.pixels,
        clean_pixels=train_batch.clean_pixels,
        vocab_tokens=None if vocabulary is None else vocabulary.tokens(task_index, step).to(device),
    )
