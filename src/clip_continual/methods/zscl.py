"""ZSCL: distillation from the zero-shot model on reference data, an L2 anchor, weight ensemble.

Follows ZSCL (Zheng et al., ICCV 2023), ``mtil/src/models/finetune.py`` (the loss and the
weight-ensemble loop), ``mtil/src/models/helpers.py`` (``distillation``, ``l2_loss``,
``merge_we``) and ``mtil/scripts/ZSCL.sh`` (the published settings: ``--image_loss
--text_loss --we --avg_freq 100 --l2 1 --ls 0.2``, reference images from ImageNet, reference
sentences from Conceptual Captions, the zero-shot model as reference model).

Here the reference images and texts are one catalog entry, ``reference_set``: an image set with
captions in memory (the embedded default holds back shapes-world pairs never used in
pretraining), or, with ``reference.size: null`` (the named benchmarks' default, as ZSCL), a
``ReferenceStream`` that hands each step a fresh batch of the whole source. The reference model
is the pretrained model of the run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clip_continual.data.reference import ReferenceStream
from clip_continual.methods.base import (
    Batch, MethodConfigError, TaskContext, Teacher, image_features, module_bytes, reference_set_bytes,
    soft_target_cross_entropy, tensor_bytes,
)
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.vocabulary import derive_seed
from clip_continual.model.weights import interpolate_state_dicts

_STREAM_REFERENCE = 11  # keeps the reference batches apart from the loop's random streams


def l2_to_anchor(model: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_p ||p - p_anchor||^2`` over the trainable parameters (ZSCL helpers.l2_loss: a
    summed squared error against the model the task started from)."""
    terms = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters() if p.requires_grad]
    return torch.stack(terms).sum()


def caption_list(reference_set) -> list[str]:
    """Every caption of the reference set (ZSCL encodes all its reference sentences)."""
    if reference_set.captions is None:
        raise ValueError("zscl needs a reference set with captions (reference texts)")
    return [str(c) for c in np.asarray(reference_set.captions).reshape(-1) if str(c)]


class WeightEnsemble:
    """ZSCL's ``merge_we``: the running mean of the task's start weights and the weights after
    every ``every``-th step (1-based steps 1, 1 + every, ...), the model the task hands on.

    ZSCL's loop runs one iteration more than its task length (``range(iterations + 1)``,
    finetune.py), at the cosine schedule's lr of 0: a step that leaves the weights as they are,
    whose merge is due when the length is a multiple of ``every`` (MTIL: iteration 1000 of
    1000, so the final weights are in the mean). ``finish`` adds them in that case."""

    def __init__(self, start: dict[str, torch.Tensor], every: int) -> None:
        self.every = every
        self.mean = {name: value.detach().clone() for name, value in start.items()}
        self.count = 1
        self.last_step = 0

    def finish(self, weights: dict[str, torch.Tensor]) -> None:
        """The merge of ZSCL's extra, lr-0 iteration after ``last_step`` steps."""
        if self.last_step and self.due(self.last_step + 1):
            self.add(weights)

    def due(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def add(self, weights: dict[str, torch.Tensor]) -> None:
        # mean_{n+1} = (n * mean_n + theta) / (n + 1): an interpolation with weight n / (n + 1).
        self.mean = interpolate_state_dicts(self.mean, weights, self.count / (self.count + 1))
        self.count += 1


class ZeroShotContinualLearning(FineTuning):
    """``L = CE_ls + w_i * D(z, z_0) + w_t * D(z^T, z_0^T) + w_l2 * ||theta - theta_start||^2``.

    On a batch of reference images x_r (as many as training images, drawn anew each step) and
    ALL reference captions c: ``z = s * f_I(x_r) . f_T0(c)``, ``z_0 = s * f_I0(x_r) . f_T0(c)``
    with f_0 the frozen zero-shot model and s the student's exp(logit_scale) (detached on the
    target side). As in ZSCL's code the text features on both sides come from the zero-shot
    model, so D distils the image encoder; the transposed term distils caption -> image
    logits. D is the soft-target cross-entropy at temperature T (2) times T^2. CE uses label
    smoothing 0.2 as published. Every ``average_every`` steps the weights join a running mean
    (with the task's start weights), and the task hands on that mean.
    """

    name = "zscl"
    needs_inputs = ("reference_set", "pretrained_model")

    def __init__(self, image_loss: float = 1.0, text_loss: float = 1.0, temperature: float = 2.0,
                 l2: float = 1.0, average_every: int | None = 100, label_smoothing: float = 0.2) -> None:
        super().__init__(label_smoothing=label_smoothing)
        for key, value in (("image_loss", image_loss), ("text_loss", text_loss), ("l2", l2)):
            if not float(value) >= 0.0:
                raise MethodConfigError(f"{key} must be a non-negative number, got {value}")
        if not float(temperature) > 0:
            raise MethodConfigError(f"temperature must be positive, got {temperature}")
        if average_every is not None and (isinstance(average_every, bool) or not isinstance(average_every, int)
                                          or average_every < 1):
            raise MethodConfigError(f"average_every must be a positive integer or null, got {average_every!r}")
        self.image_loss, self.text_loss, self.l2 = float(image_loss), float(text_loss), float(l2)
        self.temperature = float(temperature)
        self.average_every = average_every
        self._start: dict[str, torch.Tensor] | None = None
        self._state: dict | None = None

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        # The weights the task starts from: the L2 anchor and the ensemble's first member.
        self._start = {name: p.detach().clone() for name, p in student.named_parameters()}

    def before_task(self, task: TaskContext) -> None:
        if self._start is None:
            raise RuntimeError("zscl.prepare_student must see the student before the task starts")
        reference = task.extras["reference_set"]
        zero_shot = task.extras["pretrained_model"]
        if zero_shot.device != task.device:
            zero_shot = zero_shot.clone()
            zero_shot.model.to(task.device)
        zero_shot.model.eval()
        teacher = Teacher(zero_shot.model, task.autocast)
        streamed = isinstance(reference, ReferenceStream)
        captions = caption_list(reference)
        texts = torch.cat([teacher.text_features(task.tokenize(captions[begin:begin + 1024]))
                           for begin in range(0, len(captions), 1024)])  # fixed: once per task
        self._state = {
            "reference": reference,
            "teacher": teacher,
            "texts": texts,
            # A fixed set's teacher features, each computed once; a stream's change every step.
            "images": None if streamed else torch.zeros(len(reference), texts.shape[1], device=task.device,
                                                        dtype=texts.dtype),
            "known": None if streamed else torch.zeros(len(reference), dtype=torch.bool),
            "stream": None,
            "seed": torch.initial_seed(),
            "ensemble": None if self.average_every is None else WeightEnsemble(self._start, self.average_every),
        }

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        state, self._state, self._start = self._state, None, None
        ensemble = state and state["ensemble"]
        if ensemble is not None:
            ensemble.finish({name: p.detach() for name, p in student.named_parameters()})
            with torch.no_grad():
                for name, parameter in student.named_parameters():
                    parameter.copy_(ensemble.mean[name])

    def extra_storage_bytes(self, task: TaskContext, student: nn.Module) -> dict[str, int]:
        """The reference set, the zero-shot model distilled from, and copies of the student's
        weights: the L2 anchor and the running mean of the weight ensemble."""
        weights = tensor_bytes(student.parameters())
        return super().extra_storage_bytes(task, student) | {
            "reference_set": reference_set_bytes(task.extras.get("reference_set")),
            "teacher": module_bytes(task.extras["pretrained_model"].model),
            "weight_copies": weights * (1 if self.average_every is None else 2),
        }

    def after_optimizer_step(self, student: nn.Module, step: int, task: TaskContext) -> None:
        ensemble = self._state["ensemble"]
        if ensemble is not None:
            ensemble.last_step = step
            if ensemble.due(step):
                ensemble.add({name: p.detach() for name, p in student.named_parameters()})

    def reference_rows(self, step: int, count: int) -> np.ndarray:
        """This step's reference images: a pure function of (task seed, step)."""
        size = len(self._state["reference"])
        rng = np.random.default_rng(derive_seed(self._state["seed"], _STREAM_REFERENCE, step))
        return rng.choice(size, min(count, size), replace=False)

    def _reference_batch(self, step: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """This step's reference rows and uint8 images: from the fixed set in memory, or the
        stream's next batch (decoded ahead by the DataLoader's workers)."""
        state = self._state
        reference = state["reference"]
        if not isinstance(reference, ReferenceStream):
            rows = self.reference_rows(step, count)
            return rows, reference.images[rows]
        if state["stream"] is None or state["stream_step"] != step:
            state["stream"] = reference.batches(state["seed"], count, first_step=step)
        _, rows, images = next(state["stream"])
        state["stream_step"] = step + 1
        return rows[:count], images[:count]

    def _teacher_images(self, rows: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
        """The zero-shot model's features of reference images, each computed once per task
        (every time for a stream, whose images do not come back within a task)."""
        state = self._state
        if state["images"] is None:
            return state["teacher"].image_features(pixels)
        index = torch.from_numpy(rows)
        missing = ~state["known"][index]
        if missing.any():
            state["images"][index[missing].to(state["images"].device)] = \
                state["teacher"].image_features(pixels[missing.to(pixels.device)])
            state["known"][index[missing]] = True
        return state["images"][index.to(state["images"].device)]

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(student, batch, task)
        state = self._state
        # As many reference images as the global batch has; each worker encodes its part and
        # the logits are the whole reference batch's (the text term is a softmax over its images).
        rows, images = self._reference_batch(batch.step, batch.global_size)
        part = task.workers.part(len(rows))
        pixels = task.preprocess(images[part])
        scale = student.logit_scale.exp()
        logits = scale * task.workers.gather(image_features(student, pixels)) @ state["texts"].t()
        teacher = task.workers.gather(self._teacher_images(rows[part], pixels))
        targets = scale.detach() * teacher @ state["texts"].t()
        if self.image_loss:
            terms["zscl_image"] = self.image_loss * soft_target_cross_entropy(logits, targets, self.temperature)
        if self.text_loss:
            terms["zscl_text"] = self.text_loss * soft_target_cross_entropy(
                logits.t(), targets.t(), self.temperature)
        if self.l2:
            terms["l2"] = self.l2 * l2_to_anchor(student, self._start)
        return terms
