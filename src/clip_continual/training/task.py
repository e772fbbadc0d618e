"""One task's training, built once. ``training_task`` checks the plain inputs and returns a
``TrainingTask`` (what to train; it travels to data-parallel workers as it is); the builders
below turn it into what the loop's steps share on the training device: the student copy, the
teacher, the method's view of the task (``TaskContext``) and the batches in order.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import (
    InMemoryImages, LazyImages, LoaderConfig, TaskImages, TrainBatch, TrainingSource, training_source,
)
from clip_continual.methods.base import Batch, ContinualMethod, TaskContext, Teacher
from clip_continual.methods.vocabulary import ReplayVocabulary, derive_seed
from clip_continual.model.clip import ClipModel, set_trainable_parts
from clip_continual.training.augment import AUGMENT_STREAM, augment_crop_flip, augment_zscl
from clip_continual.training.config import TrainingConfig
from clip_continual.training.replica import Replica
from clip_continual.training.schedule import BatchOrder, TrainingPlan, global_batch_size, plan_training
from clip_continual.training.speed import channels_last_pixels

logger = logging.getLogger(__name__)

MIN_PRECOMPUTE_BATCH = 256


@dataclass
class TrainingTask:
    """What one task trains, checked: the start model (never modified), the training images as a
    ``TrainingSource``, one prompt per class of the updated task (index = global label), the
    classes learnt now and all learnt so far, the settings and the method (read its
    ``export_state()`` afterwards), and what the method reads besides the batches."""

    start: ClipModel
    source: TrainingSource
    class_prompts: list[str]
    current_classes: list[int]
    seen_classes: list[int]
    config: TrainingConfig
    method: ContinualMethod
    plan: TrainingPlan
    vocabulary: ReplayVocabulary | None = None
    teacher: ClipModel | None = None
    task_index: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    previous_state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The task's seed: everything the task draws is a pure function of it and the step."""
        return self.config.seed + self.task_index


def training_task(
    start: ClipModel,
    train_set: ImageSet | TrainingSource | LazyImages,
    class_prompts: Sequence[str],
    current_classes: Sequence[int] | None = None,
    seen_classes: Sequence[int] | None = None,
    config: TrainingConfig | None = None,
    vocabulary: ReplayVocabulary | None = None,
    teacher: ClipModel | None = None,
    task_index: int = 0,
    method: ContinualMethod | None = None,
    loader: LoaderConfig | None = None,
    extras: Mapping[str, Any] | None = None,
    previous_state: Mapping[str, np.ndarray] | None = None,
) -> TrainingTask:
    """``train_set`` is an in-memory ``ImageSet`` or a lazy set (a prepared split, an
    ``ImageIndex``) read by DataLoader workers as ``loader`` says. ``current_classes`` (default:
    all) are learnt now, ``seen_classes`` (default: the current ones) are all classes learnt so
    far, current included. ``teacher`` is the frozen model the method distils from (may be
    ``start`` itself; with teacher "previous" and none given, ``start`` is the teacher); it is only
    read. ``method`` overrides the method named by ``config`` with a ready instance. ``extras``
    are the named inputs the method declares in ``needs_inputs`` (e.g. ``reference_set``);
    ``previous_state`` the arrays it exported after the previous task."""
    config = config or TrainingConfig()
    method = method or config.build_method()
    source = training_source(train_set, loader)
    current, seen = _checked_classes(source, class_prompts, current_classes, seen_classes)
    extras = dict(extras or {})
    missing = [name for name in method.needs_inputs if extras.get(name) is None]
    if missing:
        raise ValueError(f"method '{method.name}' needs the input(s) {missing}; pass them in `extras`")
    return TrainingTask(
        start, source, list(class_prompts), current, seen, config, method, _plan(config, method, len(source)),
        _checked_vocabulary(method, vocabulary, start), _checked_teacher(method, start, teacher, config),
        task_index, extras, dict(previous_state or {}),
    )


def _plan(config: TrainingConfig, method: ContinualMethod, num_images: int) -> TrainingPlan:
    """The task's length; a method without gradient steps sees every image ``method.passes``
    times, whatever steps and epochs say (a closed-form solution needs all of them)."""
    if not method.gradient_steps:
        config = replace(config, steps=None, epochs=method.passes)
    return plan_training(config, num_images)


def _class_ids(name: str, classes: Sequence[int] | None, default: list[int]) -> list[int]:
    if classes is None:
        return default
    ids = sorted({int(c) for c in classes})
    if not ids:
        raise ValueError(f"{name} is empty")
    return ids


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


def _checked_teacher(method: ContinualMethod, start: ClipModel, teacher: ClipModel | None,
                     config: TrainingConfig) -> ClipModel | None:
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
    return teacher


# --- built once per task, on the training device ---------------------------------------------

def build_student(task: TrainingTask, device: torch.device) -> ClipModel:
    """A copy of the start model on ``device`` in training mode (eval mode for a method without
    gradient steps), changed by the method where it adapts the architecture."""
    torch.manual_seed(task.seed)  # what the method draws for the student (adapters) is the task's
    student = task.start.clone()
    student.model.to(device)
    task.method.prepare_student(student.model, task.config.parts)
    student.model.train(task.method.gradient_steps)  # frozen features are read in eval mode
    return student


def trainable_parameters(task: TrainingTask, student: ClipModel) -> list[nn.Parameter]:
    """The student's trainable parameters, the only ones left requiring gradients; chosen once
    the method has fitted the student to the task (``prepare_for_task``)."""
    config = task.config
    if task.method.gradient_steps:
        trainable = set_trainable_parts(student.model, config.parts)
    else:  # solved in closed form on a frozen model (RAIL): nothing takes a gradient
        student.model.requires_grad_(False)
        trainable = []
    if not config.train_logit_scale and hasattr(student.model, "logit_scale"):
        # ZSCL mtil/src/models/finetune.py: exclude_params_name = ["logit_scale"]
        student.model.logit_scale.requires_grad_(False)
        trainable = [p for p in trainable if p is not student.model.logit_scale]
    return trainable


def build_teacher(task: TrainingTask, device: torch.device) -> ClipModel | None:
    """The task's teacher on ``device``: the caller's model where it already lives there, else
    a private copy (moving the caller's model would change it)."""
    teacher = task.teacher
    if teacher is not None and not _same_device(teacher.device, device):
        teacher = teacher.clone()
        teacher.model.to(device)
    return teacher


def _same_device(first: torch.device, second: torch.device) -> bool:
    """'cuda' and 'cuda:0' are the same device when 0 is the current one."""
    def canonical(device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device
    return canonical(first) == canonical(second)


def task_context(task: TrainingTask, student: ClipModel, teacher: ClipModel | None, device: torch.device,
                 autocast: Callable[[], ContextManager], replica: Replica | None = None) -> TaskContext:
    """What the method sees of the task for all its steps (see ``TaskContext``); ``replica``
    is this process's part of a data-parallel run (its ``workers``)."""
    source = task.source
    return TaskContext(
        task_index=task.task_index,
        device=device,
        class_tokens=student.tokenize(task.class_prompts).to(device),
        current_classes=torch.tensor(task.current_classes, device=device),
        seen_classes=torch.tensor(task.seen_classes, device=device),
        vocabulary=task.vocabulary,
        teacher=None if teacher is None else Teacher(teacher.model, autocast),
        autocast=autocast,
        seed=task.seed,
        train_set=source.image_set if isinstance(source, InMemoryImages) else None,
        train_images=TaskImages(source, student, task.config.progress),
        preprocess=functools.partial(student.preprocess, device=device),
        tokenize=lambda texts: student.tokenize(list(texts)).to(device),
        extras=task.extras,
        previous_state=task.previous_state,
        class_names=tuple(str(name) for name in source.class_names),
        workers=replica or Replica(),
    )


def precompute_teacher_features(task: TrainingTask, context: TaskContext, student: ClipModel) -> None:
    """The fixed teacher's features of every clean training image, once per task; pays once
    the task shows every image at least once on average."""
    method, plan, device = task.method, task.plan, context.device
    teacher_reads_clean = method.distills_clean_images or task.config.augment == "none"
    if (context.teacher is not None and method.uses_teacher_images and teacher_reads_clean
            and plan.total_steps * plan.batch_size >= plan.num_images):
        batches = task.source.clean_batches(student, max(plan.batch_size, MIN_PRECOMPUTE_BATCH), device)
        context.teacher.precompute_image_features(
            ((torch.from_numpy(indices).to(device), pixels) for indices, pixels in batches),
            plan.num_images,
        )


# --- the batches --------------------------------------------------------------------------------

def task_batches(task: TrainingTask, student: ClipModel, device: torch.device,
                 replica: Replica) -> Iterator[TrainBatch]:
    """This replica's part of the task's batches in the order of ``BatchOrder``, augmented as the
    settings say: a pure function of (seed, step)."""
    order = BatchOrder(task.plan, task.seed)
    global_indices = [order.indices(step) for step in range(task.plan.total_steps)]
    parts = [replica.part(len(batch)) for batch in global_indices]
    indices = [batch[part] for batch, part in zip(global_indices, parts)]  # this replica's share
    augment = task.config.augment
    need_clean = augment != "none" and task.method.distills_clean_images
    if not isinstance(task.source, InMemoryImages):  # the DataLoader workers augment
        return task.source.train_batches(student, indices, device, augment if augment != "none" else False,
                                         need_clean, seed=task.seed)
    transform = augment_crop_flip if augment == "crop_flip" else augment_zscl

    def augmented(step: int, images: np.ndarray) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(task.seed, AUGMENT_STREAM, step))
        return transform(images, student, generator, device, parts[step], len(global_indices[step]))

    return task.source.train_batches(student, indices, device, augmented if augment != "none" else None,
                                     need_clean)


def make_batch(task: TrainingTask, step: int, train_batch: TrainBatch, device: torch.device) -> Batch:
    """The step's ``Batch`` as the method reads it: the loaded pixels with labels and the
    replayed vocabulary's rows of this step (this replica's part of the global batch)."""
    indices, vocabulary = train_batch.indices, task.vocabulary
    return Batch(
        step=step,
        indices=torch.from_numpy(indices).to(device),
        labels=torch.from_numpy(task.source.labels[indices]).long().to(device),
        pixels=channels_last_pixels(train_batch.pixels, task.config),
        clean_pixels=channels_last_pixels(train_batch.clean_pixels, task.config),
        vocab_tokens=None if vocabulary is None else vocabulary.tokens(task.task_index, step).to(device),
        global_size=global_batch_size(task.plan, step),
    )
