"""What every continual-learning method shares: the task and batch a loss sees, the frozen
teacher, and the loss functions of the paper written once.

A method turns a batch into named loss terms (already weighted, so the training loop simply sums
them) and may prepare per-task state in ``before_task`` (e.g. the teacher's class-text features,
computed once per task) and drop it in ``after_task``.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import TaskImages
from clip_continual.methods.vocabulary import ReplayVocabulary
from clip_continual.model.clip import encode_images, encode_text, full_precision


class MethodConfigError(ValueError):
    """A method name or hyper-parameter is unknown or out of range."""


# --- the losses of the paper, as pure functions --------------------------------------------

def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), temperature 1, averaged over the batch rows."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=-1), F.softmax(teacher_logits, dim=-1), reduction="batchmean"
    )


def soft_target_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ZSCL's distillation: CE(student / T, softmax(teacher / T)) averaged over rows, times T^2."""
    targets = F.softmax(teacher_logits / temperature, dim=-1)
    return F.cross_entropy(student_logits / temperature, targets) * temperature**2


# --- the context a method sees ------------------------------------------------------------

class Workers:
    """The processes a task trains on, as a method sees them; this one is a process alone.

    In a data-parallel run (``training.distributed``) every worker holds the same model and
    method state and trains its ``part`` of every global batch; a method whose loss term or
    statistics need more than its part asks here: ``gather`` (the global batch's rows of a
    tensor, differentiable: the gradient reaches each worker's own rows), ``sum`` (a statistic
    summed over the workers' parts, e.g. a Fisher estimate split over them). Alone, each is the
    identity, so a method's code is the same in both runs."""

    rank = 0
    world_size = 1

    def part(self, global_size: int) -> slice:
        """This worker's contiguous rows of ``global_size`` (all of them alone)."""
        return slice(0, global_size)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every worker's ``rows`` concatenated in rank order: the global batch's."""
        return rows

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the workers (the same on each of them afterwards)."""
        return values


@contextlib.contextmanager
def evaluation_mode(model: nn.Module | None):
    """Put ``model`` in eval mode and restore every submodule's own mode afterwards, so a
    teacher borrowed from the caller is left exactly as it came."""
    if model is None:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class Teacher:
    """A frozen model whose outputs are targets. All its work runs under ``inference_mode``,
    so no graph is built and no gradient can reach it; results are cloned out of inference
    mode because autograd may save them for the student's backward pass."""

    def __init__(self, model: nn.Module, autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.model = model
        self.autocast = autocast
        with torch.inference_mode():
            scale = full_precision(model.logit_scale.detach()).exp()
        self.scale = scale.clone()
        self.image_table: torch.Tensor | None = None

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            features = full_precision(encode_text(self.model, tokens))
        return features.clone()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            features = full_precision(encode_images(self.model, pixels))
        return features.clone()

    def precompute_image_features(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_images: int
    ) -> None:
        """Fill a (num_images, D) table from (indices, un-augmented pixels) batches; within a
        task the teacher is fixed, so each image's features need computing only once."""
        table = None
        filled = 0
        with torch.inference_mode():
            for indices, pixels in batches:
                with self.autocast():
                    features = full_precision(encode_images(self.model, pixels))
                if table is None:
                    table = torch.empty(num_images, features.shape[1], dtype=features.dtype, device=features.device)
                table[indices] = features
                filled += len(indices)
        if table is None or filled < num_images:
            raise ValueError(f"teacher image table got {filled} of {num_images} images")
        self.image_table = table.clone()

    def image_features_for(self, batch: Batch, clean: bool = False) -> torch.Tensor:
        """Teacher image features of the batch: of its un-augmented images when ``clean``
        (or when there is no augmentation), else of the augmented pixels the student saw."""
        if self.image_table is not None and (clean or batch.clean_pixels is None):
            return self.image_table[batch.indices]
        return self.image_features(batch.distillation_pixels if clean else batch.pixels)


@dataclass
class TaskContext:
    """Everything about the task being learnt that stays fixed for all its steps.

    ``class_tokens`` holds the prompts of every class of the updated task (row = global label);
    ``current_classes`` are the classes learnt now, ``seen_classes`` all classes learnt so far
    (current included), both sorted global ids on the training device.

    What some methods need beyond the batch: ``train_images`` (this task's training images,
    in memory or read from files, e.g. for a Fisher estimate or exemplar selection; see
    ``TaskImages``), ``train_set`` (the same as an in-memory ``ImageSet``, None when the images
    are read from files), ``preprocess`` (uint8 images
    -> model input on the device) and ``tokenize`` (texts -> token ids on the device) of the
    student; ``extras`` holds the named inputs a method declares in ``needs_inputs`` (e.g.
    ``reference_set``); ``previous_state`` is the arrays the method exported after the previous
    task (empty for the first task); ``seed`` is the task's seed, so that whatever a method
    draws (replay batches) is a pure function of ``(seed, step)``; ``class_names`` names every
    class of the updated task (index = global label); ``workers`` the processes the task is
    trained on (``Workers``: one alone, several in a data-parallel run).
    """

    task_index: int
    device: torch.device
    class_tokens: torch.Tensor
    current_classes: torch.Tensor
    seen_classes: torch.Tensor
    vocabulary: ReplayVocabulary | None = None
    teacher: Teacher | None = None
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    seed: int = 0
    train_set: ImageSet | None = None
    train_images: TaskImages | None = None
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None
    tokenize: Callable[[list[str]], torch.Tensor] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    previous_state: Mapping[str, np.ndarray] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    workers: Workers = field(default_factory=Workers)
    label_to_current: torch.Tensor = field(init=False)
    current_in_seen: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        num_classes = len(self.class_tokens)
        current = self.current_classes.tolist()
        seen = self.seen_classes.tolist()
        if sorted(set(current)) != current or sorted(set(seen)) != seen:
            raise ValueError("current_classes and seen_classes must be sorted without repeats")
        if not current:
            raise ValueError("current_classes is empty: a task must learn at least one class")
        if not set(current) <= set(seen):
            raise ValueError(
                f"seen_classes must include the current classes; missing {sorted(set(current) - set(seen))}"
            )
        if seen[0] < 0 or seen[-1] >= num_classes:
            raise ValueError(f"class ids must lie in [0, {num_classes}) (one prompt per class)")
        # Labels are global ids; CE is over the current classes only (MST masks the others out).
        lookup = torch.full((num_classes,), -1, dtype=torch.long)
        lookup[self.current_classes.cpu()] = torch.arange(len(current))
        self.label_to_current = lookup.to(self.device)
        position = {c: i for i, c in enumerate(seen)}
        self.current_in_seen = torch.tensor([position[c] for c in current], device=self.device)

    @property
    def has_earlier_classes(self) -> bool:
        """True when some seen class was learnt in an earlier task (not the first MST phase)."""
        return len(self.seen_classes) > len(self.current_classes)


@dataclass
class Batch:
    """One training step's data. ``clean_pixels`` is the un-augmented version of ``pixels``
    when the loop augments, else None (then ``pixels`` are already clean). ``global_size`` is
    the size of the step's global batch, of which this is a worker's part in a data-parallel
    run (all of it alone): a method that replays a batch "as large as the training batch" draws
    ``global_size`` rows, the same on every worker, and keeps its ``TaskContext.workers.part``."""

    step: int
    indices: torch.Tensor
    labels: torch.Tensor
    pixels: torch.Tensor
    clean_pixels: torch.Tensor | None = None
    vocab_tokens: torch.Tensor | None = None
    global_size: int | None = None

    def __post_init__(self) -> None:
        if self.global_size is None:
            self.global_size = len(self.labels)

    @property
    def distillation_pixels(self) -> torch.Tensor:
        return self.pixels if self.clean_pixels is None else self.clean_pixels


# --- shared feature helpers -----------------------------------------------------------------

def image_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features in at least float32 (losses are computed in full precision)."""
    return full_precision(encode_images(model, pixels))


def text_features_together(model: nn.Module, *token_sets: torch.Tensor) -> list[torch.Tensor]:
    """Encode several token sets in ONE text forward (concatenate, then split): one launch of
    the text tower instead of several, with identical per-row results."""
    features = full_precision(encode_text(model, torch.cat(token_sets)))
    return list(features.split([len(tokens) for tokens in token_sets]))


def class_cross_entropy(
    logits_current: torch.Tensor, labels: torch.Tensor, task: TaskContext, label_smoothing: float = 0.0
) -> torch.Tensor:
    """CE over the logits of the current classes (columns in ``task.current_classes`` order).

    Labels are global ids and must be current classes (the loop checks this once per task
    rather than syncing with the device every step)."""
    return F.cross_entropy(logits_current, task.label_to_current[labels], label_smoothing=label_smoothing)


# --- the method interface -----------------------------------------------------------------

class ContinualMethod(ABC):
    """Base of all methods. Subclasses declare what they need; the loop provides it.

    Class attributes:
      needs_teacher             a teacher model must be given (or taken from the start model)
      needs_vocabulary          a replayed vocabulary must be given
      default_vocabulary_mode   the vocabulary mode the method was published with
      uses_teacher_images       teacher image features are read (the loop may precompute them)
      distills_clean_images     distillation runs on un-augmented images (ZSCL)
      needs_inputs              names of ``TaskContext.extras`` the method reads (e.g.
                                ``reference_set``); the loop refuses to start without them
      task_identity             whether its inference rule reads the task of the test images
                                (``model.adapters.evaluated_task``): "unused", "optional" (uses
                                it when given) or "required" (refused under
                                ``evaluation.task_identity: hidden``)
      label_spaces              the ``evaluation.label_space`` values its inference rule
                                defines (``evaluation.protocols``); others are refused

    A method with ``gradient_steps = False`` (RAIL: a classifier solved in closed form on frozen
    features) gets no optimizer and no backward: the loop shows it every training image
    ``passes`` times, batch by batch, through ``fit_batch``, and the method writes what it
    solved into the student in ``after_task``.

    Hooks around the optimizer step, in the loop's order: ``loss_terms`` -> backward ->
    (gradients unscaled) ``before_optimizer_step`` (e.g. gradient projection) -> clipping ->
    optimizer step -> ``after_optimizer_step`` (e.g. a weight ensemble). ``export_state``
    hands arrays on to the next task (``TaskContext.previous_state``), stored between tasks.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    needs_vocabulary: ClassVar[bool] = False
    default_vocabulary_mode: ClassVar[str | None] = None
    uses_teacher_images: ClassVar[bool] = False
    distills_clean_images: ClassVar[bool] = False
    needs_inputs: ClassVar[tuple[str, ...]] = ()
    replays_pairs: ClassVar[bool] = False  # its reference set must hold image-caption pairs
    gradient_steps: ClassVar[bool] = True  # False: fit_batch instead of loss, backward and step
    passes: int = 1  # epochs of a method without gradient steps (whatever the training length says)
    task_identity: ClassVar[str] = "unused"
    label_spaces: ClassVar[tuple[str, ...]] = ("own", "learned_tasks", "all_tasks")

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise MethodConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def hyper_parameter_names(cls) -> list[str]:
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for parameter in list(inspect.signature(init).parameters.values())[1:]:
                if parameter.kind is parameter.KEYWORD_ONLY or parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
                    if parameter.name not in names:
                        names.append(parameter.name)
        return names

    def hyper_parameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.hyper_parameter_names() if hasattr(self, name)}

    def check_files(self) -> None:
        """Raise one clear error when a file or folder the method's options name is missing;
        called before a benchmark prepares its data. Default: the method reads none."""

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        """Change the student's architecture before its parameters are chosen for training
        (e.g. add adapters, ``model.adapters``); ``parts`` is the loop's setting."""

    def prepare_for_task(self, student: nn.Module, task: TaskContext) -> None:
        """Fit the student to the task's data before its trainable parameters are chosen (e.g.
        DPW's prefix heads sized from the task's features, DIKI's task Gaussian)."""

    def before_task(self, task: TaskContext) -> None:
        """Prepare per-task state (called once, after the teacher is ready)."""

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        """Release per-task state; may also post-process the trained ``student`` in place
        (e.g. a weight interpolation). Called once the steps are over, also after a failure."""

    def before_optimizer_step(self, student: nn.Module, batch: Batch, task: TaskContext) -> None:
        """Called after backward with true (unscaled) gradients, before clipping and the step:
        the place to modify ``p.grad`` (A-GEM / GEM projection)."""

    def after_optimizer_step(self, student: nn.Module, step: int, task: TaskContext) -> None:
        """Called after the optimizer step (and the logit-scale clamp); ``step`` is 1-based."""

    def fit_batch(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, float]:
        """A method without gradient steps learns from one batch (no graph is built); returns
        named numbers to log (their sum is logged as ``loss``)."""
        raise NotImplementedError(f"method '{self.name}' trains by gradient steps (loss_terms)")

    def export_state(self) -> dict[str, np.ndarray]:
        """Arrays to hand on to the next task (stored without pickle between tasks); called
        after ``after_task``. Default: nothing."""
        return {}

    def handed_on(self) -> dict[str, np.ndarray]:
        """What the next task receives: ``export_state()``, or, once a data-parallel run has
        trained this method in its workers, what the first worker's copy exported there."""
        adopted = getattr(self, "_adopted_state", None)
        return self.export_state() if adopted is None else dict(adopted)

    def adopt_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take over the state another copy of this method exported (the first worker's)."""
        self._adopted_state = dict(state)

    def extra_storage_bytes(self, task: TaskContext, student: nn.Module) -> dict[str, int]:
        """What the method keeps beyond the weights of the architecture it trains, by kind, in
        bytes: a cost of the method (``training.costs``). Called once the task is over, after
        ``export_state``. Default: the teacher it reads (a whole model kept beside the student)
        and the arrays it hands on (exemplars, Fisher matrices); a method that keeps more
        (adapters, a reference set, an ensemble of weights) adds it."""
        kept = {"teacher": module_bytes(task.teacher.model)} if task.teacher is not None else {}
        handed_on = array_bytes(self.export_state().values())
        return kept | ({"handed_on": handed_on} if handed_on else {})

    @abstractmethod
    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        """Named, already weighted scalar loss terms of this batch; the loop sums them."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper_parameters().items())
        return f"{type(self).__name__}({args})"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes ``tensors`` hold (each counted once, however often it is listed)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def module_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters and buffers: what keeping a copy of it costs."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def array_bytes(arrays: Iterable[Any]) -> int:
    return sum(np.asarray(array).nbytes for array in arrays)


def reference_set_bytes(reference: Any) -> int:
    """The bytes of a reference set's images: an in-memory set's arrays; a set streamed from
    its files (``ReferenceStream``) as uint8 images at the resolution it is decoded to."""
    if reference is None:
        return 0
    if isinstance(getattr(reference, "images", None), np.ndarray):
        return int(reference.images.nbytes)
    return len(reference) * int(reference.image_size) ** 2 * 3


def require_alpha(alpha: float, name: str = "alpha") -> float:
    alpha = float(alpha)
    if not alpha >= 0.0:
        raise MethodConfigError(f"{name} must be a non-negative number, got {alpha}")
    return alpha
