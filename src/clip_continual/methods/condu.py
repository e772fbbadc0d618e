"""ConDU: Continual Decoupling-Unifying (Zhang et al., ICLR 2026, arXiv 2503.10705).

Follows zhangzicong518/ConDU: ``src/main.py`` (each task fine-tuned from the pretrained CLIP, no
``--load``; then every earlier task's model is rebuilt from the previous unified delta and all
task deltas are unified again), ``src/delta_models.py`` (``unify_delta_models``: elected sign,
largest agreeing magnitude, per-task masks and rescalers), ``src/models/finetune.py`` (the loss,
which parameters train, the class prototypes) and ``src/models/evaluation.py`` (``evaluate``:
each seen dataset with its own expert; ``agnostic_evaluate``: semantic voting for unseen data).

What the model carries (an adapter kind "condu" of ``model/adapters.py``, so checkpoints load
back with it): its live weights are always the pretrained ones (every task starts from them), and
``model.task_experts`` holds the unified delta, each task's mask and rescaler and each task's
class prototypes. At evaluation (eval mode) the model encodes as ConDU's ensemble does; see
``TaskExperts``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clip_continual.methods.base import MethodConfigError, TaskContext, evaluation_mode
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.lora import add_lora, check_rank, lora_parameters
from clip_continual.model.adapters import (
    ENSEMBLE_ATTRIBUTE, TOWERS_OF_PARTS, adapter_recipe, add_adapters, evaluated_task, register_adapter_kind,
)
from clip_continual.model.clip import encode_images, encode_text

VARIANTS = ("full", "lora")


# --- decoupling and unifying task deltas (ConDU src/delta_models.py) ---------------------------

def unify_tensor(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One parameter's deltas of T tasks, stacked (T, ...), unified as ``unify_delta_models``:
    the sign of the mean delta (+1 where the mean is > 0, else -1), the largest magnitude among
    the tasks that agree with it, each task's mask (its delta agrees with the sign). Also each
    task's mean |delta| and mean |unified * mask|, the two sums its rescaler is the ratio of."""
    sign = (deltas.mean(0) > 0).to(deltas.dtype) * 2 - 1
    masks = deltas * sign > 0
    unified = (deltas * masks).abs().amax(0) * sign
    before = deltas.abs().reshape(len(deltas), -1).mean(1)
    after = (unified * masks).abs().reshape(len(deltas), -1).mean(1)
    return unified, masks, before, after


def rescalers_from(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Each task's ``sum mean|delta| / sum mean|unified * mask|`` over parameters. A task whose
    mask keeps nothing rebuilds a zero delta whatever its rescaler: 1 there (upstream: 0/0)."""
    return torch.where(after > 0, before / after.clamp_min(torch.finfo(after.dtype).tiny), torch.ones_like(after))


def unify_deltas(stacks: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor],
                                                                      list[dict[str, torch.Tensor]], torch.Tensor]:
    """T tasks' deltas, one parameter at a time as (name, (T, ...) stack), so that only one
    parameter's deltas are ever held -> (unified delta, each task's masks, rescalers (T,))."""
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = []
    before = after = None
    for name, deltas in stacks:
        unified[name], key_masks, key_before, key_after = unify_tensor(deltas)
        masks = masks or [{} for _ in key_masks]
        for task, mask in enumerate(key_masks):
            masks[task][name] = mask
        before = key_before if before is None else before + key_before
        after = key_after if after is None else after + key_after
    return unified, masks, rescalers_from(before, after)


def stacked(deltas: list[dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Deltas given task by task (name -> tensor) as ``unify_deltas`` takes them."""
    return ((name, torch.stack([delta[name] for delta in deltas])) for name in deltas[0])


def rebuild_delta(unified: torch.Tensor, mask: torch.Tensor, rescaler: torch.Tensor) -> torch.Tensor:
    """One task's delta of one parameter from the unified one (src/main.py:62-64)."""
    return unified * mask * rescaler


# --- semantic voting (ConDU src/models/evaluation.py, agnostic_evaluate) --------------------------

def rank_tasks(image_features: torch.Tensor, prototypes: list[torch.Tensor]) -> torch.Tensor:
    """(B, T) task indices, best first: by the largest cosine between each image's (frozen
    CLIP) feature and the task's class prototypes."""
    similarity = torch.stack([(image_features @ p.t().to(image_features.dtype)).amax(1) for p in prototypes], 1)
    return similarity.argsort(dim=1, descending=True)


def voters(image_features: torch.Tensor, prototypes: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """(B, 1 + min(k, T)) models whose logits each image averages: 0 (the pretrained model)
    and the experts (1-based) of its top-k tasks."""
    ranked = rank_tasks(image_features, prototypes)[:, :top_k] + 1
    return torch.cat([torch.zeros_like(ranked[:, :1]), ranked], 1)


# --- the experts a model carries -----------------------------------------------------------------

class _Encoder(nn.Module):
    """The model under another name, so ``functional_call`` runs one of our encoders with an
    expert's weights (the parameters are the model's, keyed ``model.<name>``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if images is not None:
            return encode_images(self.model, images)
        return encode_text(self.model, tokens)


class TaskExperts(nn.Module):
    """ConDU's store: the unified delta over ``names`` (the parameters that train), each task's
    masks, rescalers and class prototypes, all buffers. Expert t is the model with weights
    ``live + unified * mask_t * rescaler_t``; the live weights are the pretrained ones.

    At evaluation both towers encode as the concatenation of T + 1 blocks, one per model (0: the
    pretrained, t: expert t), each an L2-normalised feature: text in every block; an image in
    the blocks of the models that vote for it, zeros elsewhere. Every image has the same number
    of voters, so a cosine of the two is the average of the voters' cosines times one constant,
    and every classifier and retrieval ranks exactly as ConDU's averaged logits (its logit
    scale is one fixed number). Voters: when the evaluation gives the images' task and it is a learnt one (MTIL:
    a seen dataset) that task's expert alone (``evaluate``); otherwise, or with
    ``task_agnostic``, the pretrained model and the experts of the image's ``top_k`` tasks
    by prototype (``agnostic_evaluate``).
    """

    def __init__(self, names: list[str], shapes: list[torch.Size], classes: list[int], embed_dim: int,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.names = list(names)
        self.top_k, self.task_agnostic = 4, False
        self.busy = False
        for j, shape in enumerate(shapes):
            self.register_buffer(f"unified_{j}", torch.zeros(shape, device=like.device, dtype=like.dtype))
        self.register_buffer("rescalers", torch.ones(len(classes), device=like.device, dtype=like.dtype))
        for task, count in enumerate(classes):
            for j, shape in enumerate(shapes):
                self.register_buffer(f"mask_{task}_{j}", torch.zeros(shape, device=like.device, dtype=torch.bool))
            self.register_buffer(f"prototypes_{task}", torch.zeros(count, embed_dim, device=like.device,
                                                                    dtype=like.dtype))

    @property
    def tasks(self) -> int:
        return len(self.rescalers)

    @property
    def ready(self) -> bool:
        return self.tasks > 0 and not self.busy

    def unified(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"unified_{j}") for j, name in enumerate(self.names)}

    def masks(self, task: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"mask_{task}_{j}") for j, name in enumerate(self.names)}

    def prototypes(self) -> list[torch.Tensor]:
        return [getattr(self, f"prototypes_{task}") for task in range(self.tasks)]

    def task_delta(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s (0-based) delta rebuilt from the unified one."""
        masks, rescaler = self.masks(task), self.rescalers[task]
        return {name: rebuild_delta(unified, masks[name], rescaler) for name, unified in self.unified().items()}

    def store(self, unified: dict[str, torch.Tensor], masks: list[dict[str, torch.Tensor]],
              rescalers: torch.Tensor, prototypes: list[torch.Tensor]) -> None:
        """Replace the store with these tasks (buffers re-registered: their count grows)."""
        for name in [n for n, _ in self.named_buffers(recurse=False)]:
            delattr(self, name)
        for j, name in enumerate(self.names):
            self.register_buffer(f"unified_{j}", unified[name])
        self.register_buffer("rescalers", rescalers)
        for task, (task_masks, task_prototypes) in enumerate(zip(masks, prototypes)):
            for j, name in enumerate(self.names):
                self.register_buffer(f"mask_{task}_{j}", task_masks[name])
            self.register_buffer(f"prototypes_{task}", task_prototypes)

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        """The model encodes with its live weights only (no ensemble) within the block."""
        busy, self.busy = self.busy, True
        try:
            yield
        finally:
            self.busy = busy

    # --- the ensemble's encoders ---------------------------------------------------------

    def _oracle(self, model: nn.Module) -> int | None:
        """The expert (1-based) of the images' task, when the evaluation gives a learnt one."""
        task = evaluated_task(model).images
        known = None if task is None else task + 1
        return known if known is not None and not self.task_agnostic and 1 <= known <= self.tasks else None

    def _encode(self, model: nn.Module, expert: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Normalised features of model ``expert`` (0: the live, pretrained weights)."""
        with self.plain():
            if expert == 0:
                return F.normalize(_Encoder(model)(**inputs).float(), dim=-1)
            live = dict(model.named_parameters())
            weights = {f"model.{name}": live[name] + delta for name, delta in self.task_delta(expert - 1).items()}
            return F.normalize(functional_call(_Encoder(model), weights, kwargs=inputs).float(), dim=-1)

    def _blocks(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(rows, self.tasks + 1, like.shape[-1])

    def encode_images(self, model: nn.Module, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
        oracle = self._oracle(model)
        if oracle is not None:
            chosen = torch.full((len(pixels), 1), oracle, dtype=torch.long, device=pixels.device)
            base = None
        else:
            base = self._encode(model, 0, images=pixels)
            chosen = voters(base, self.prototypes(), self.top_k)
        blocks = None
        for expert in chosen.unique().tolist():
            rows = (chosen == expert).any(1).nonzero().squeeze(1)
            features = base[rows] if expert == 0 else self._encode(model, expert, images=pixels[rows])
            blocks = self._blocks(len(pixels), features) if blocks is None else blocks
            blocks[rows, expert] = features.to(blocks.dtype)
        return _finish(blocks, normalize)

    def encode_text(self, model: nn.Module, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
        oracle = self._oracle(model)
        experts = [oracle] if oracle is not None else range(self.tasks + 1)
        blocks = None
        for expert in experts:
            features = self._encode(model, expert, tokens=tokens)
            blocks = self._blocks(len(tokens), features) if blocks is None else blocks
            blocks[:, expert] = features
        return _finish(blocks, normalize)


def _finish(blocks: torch.Tensor, normalize: bool) -> torch.Tensor:
    features = blocks.flatten(1)
    return F.normalize(features, dim=-1) if normalize else features


# --- the adapter kind ------------------------------------------------------------------------------

def delta_names(model: nn.Module, recipe: dict[str, Any]) -> list[str]:
    """The parameters whose task deltas ConDU unifies: every parameter (full fine-tuning; the
    frozen logit scale's delta is zero) or the LoRA factors."""
    names = [name for name, _ in model.named_parameters()]
    return [n for n in names if ".lora_" in n] if recipe["variant"] == "lora" else names


def add_experts(model: nn.Module, recipe: dict[str, Any]) -> None:
    if recipe["variant"] == "lora":
        add_lora(model, {"rank": recipe["rank"], "towers": recipe["towers"]})
    names = delta_names(model, recipe)
    parameters = dict(model.named_parameters())
    experts = TaskExperts(names, [parameters[n].shape for n in names], list(recipe["classes"]),
                          _feature_dim(model), parameters[names[0]])
    model.add_module(ENSEMBLE_ATTRIBUTE, experts)
    configure_experts(model, recipe)


def configure_experts(model: nn.Module, recipe: dict[str, Any]) -> None:
    experts = getattr(model, ENSEMBLE_ATTRIBUTE)
    experts.top_k, experts.task_agnostic = int(recipe["top_k"]), bool(recipe["task_agnostic"])


def expert_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The LoRA variant trains its LoRA factors (full fine-tuning trains the whole model)."""
    return lora_parameters(transformer)


# Entries that change from task to task or are evaluation settings.
SETTINGS = ("classes", "top_k", "task_agnostic")
register_adapter_kind("condu", add_experts, expert_parameters, settings=SETTINGS,
                      trains_backbone=lambda recipe: recipe["variant"] == "full")


# --- the method ------------------------------------------------------------------------------------

class ContinualDecouplingUnifying(FineTuning):
    """``L = CE`` as ``ft`` (label smoothing 0.2), each task trained from the pretrained CLIP:
    the whole model (``variant: full``, logit scale frozen) or LoRA on each block's MLP
    (``variant: lora``, rank ``rank``, ``methods/lora.py``). After the task every earlier
    task's delta is rebuilt from the unified one, all deltas are unified again (``unify_deltas``),
    the live weights return to the pretrained ones and the task's class prototypes (frozen CLIP:
    normalised mean of the class's normalised image features and of its normalised prompt
    features over the templates) are kept. Evaluation: a seen MTIL dataset with its own expert,
    anything else by semantic voting over the pretrained model and the ``top_k`` experts whose
    prototypes are nearest (``task_agnostic``: voting for seen datasets too, ConDU's
    task-agnostic MTIL).
    """

    name = "condu"
    task_identity = "optional"  # reads the images' task where given (MTIL), votes where hidden

    def __init__(
        self,
        variant: str = "full",          # scripts/MTIL_FT.sh (scripts/MTIL_LoRA.sh: --lora True)
        rank: int = 64,                 # clip/model_lora.py lora_rank=64 (variant lora)
        top_k: int = 4,                 # src/args.py --logits_num 4
        task_agnostic: bool = False,    # scripts/eval_agnostic_MTIL_*.sh --task_agnostic for every dataset
        label_smoothing: float = 0.2,   # scripts/MTIL_*.sh --ls 0.2
    ) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if variant not in VARIANTS:
            raise MethodConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise MethodConfigError(f"top_k must be a positive integer, got {top_k!r}")
        self.variant, self.rank, self.top_k = variant, check_rank(rank), top_k
        self.task_agnostic = bool(task_agnostic)
        self._start: dict[str, torch.Tensor] = {}

    def _settings(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "task_agnostic": self.task_agnostic}

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        """Add the store (task 1) and keep the task's start, the pretrained weights."""
        rank = self.rank if self.variant == "lora" else None
        add_adapters(student, {"kind": "condu", "variant": self.variant, "rank": rank,
                               "towers": TOWERS_OF_PARTS[parts], "classes": [], **self._settings()})
        recipe = adapter_recipe(student)
        recipe.update(self._settings())  # a continued model takes this run's evaluation settings
        configure_experts(student, recipe)
        parameters = dict(student.named_parameters())
        names = getattr(student, ENSEMBLE_ATTRIBUTE).names
        self._start = {name: parameters[name].detach().clone() for name in names}

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        experts: TaskExperts = getattr(student, ENSEMBLE_ATTRIBUTE)
        parameters = dict(student.named_parameters())
        with torch.no_grad():
            unified, masks, rescalers = unify_deltas(self._task_deltas(experts, parameters))
            for name, start in self._start.items():  # the next task starts from the pretrained model
                parameters[name].copy_(start)
            prototypes = experts.prototypes() + [self._prototypes(task, student)]
            experts.store(unified, masks, rescalers, prototypes)
        adapter_recipe(student)["classes"] = [len(p) for p in prototypes]
        self._start = {}

    def _task_deltas(self, experts: TaskExperts,
                     parameters: dict[str, nn.Parameter]) -> Iterator[tuple[str, torch.Tensor]]:
        """Per parameter: the earlier tasks' deltas rebuilt (src/main.py:52-66), then this task's."""
        unified, masks = experts.unified(), [experts.masks(t) for t in range(experts.tasks)]
        for name, start in self._start.items():
            earlier = [rebuild_delta(unified[name], task_masks[name], rescaler)
                       for task_masks, rescaler in zip(masks, experts.rescalers)]
            yield name, torch.stack(earlier + [parameters[name].detach() - start])

    def _prototypes(self, task: TaskContext, student: nn.Module) -> torch.Tensor:
        """(C, D) prototypes of the current classes with the pretrained weights (finetune.py:156-195)."""
        experts: TaskExperts = getattr(student, ENSEMBLE_ATTRIBUTE)
        images, classes = task.train_images, task.current_classes
        if images is None or task.preprocess is None:
            raise ValueError("condu needs the task's training images in TaskContext for its prototypes")
        with experts.plain(), evaluation_mode(student), torch.inference_mode():
            sums = torch.zeros(len(task.class_tokens), _feature_dim(student), device=task.device)
            counts = torch.zeros(len(task.class_tokens), device=task.device)
            for rows, arrays in images.arrays(np.arange(len(images)), desc="condu prototypes"):
                features = F.normalize(encode_images(student, task.preprocess(arrays)).float(), dim=-1)
                labels = torch.as_tensor(images.labels[rows], device=task.device)
                sums.index_add_(0, labels, features)
                counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
            text = self._class_text(task, student)
        image = sums[classes] / counts[classes].clamp_min(1).unsqueeze(1)
        # A class without training images keeps its text feature alone (finetune.py:190-191).
        prototype = torch.where(counts[classes].unsqueeze(1) > 0, (image + text) / 2, text)
        return F.normalize(prototype, dim=-1).to(next(iter(self._start.values())).dtype).clone()

    def _class_text(self, task: TaskContext, student: nn.Module) -> torch.Tensor:
        """Each current class's mean normalised prompt feature over the templates (the
        benchmark's prompt sets when given, else the training prompt)."""
        prompt_sets = task.extras.get("prompt_sets") or []
        if prompt_sets and task.tokenize is not None:
            current = task.current_classes.tolist()
            token_sets = [task.tokenize([prompts[c] for c in current]) for prompts in prompt_sets]
        else:
            token_sets = [task.class_tokens[task.current_classes]]
        features = [F.normalize(encode_text(student, tokens).float(), dim=-1) for tokens in token_sets]
        return torch.stack(features).mean(0)


def _feature_dim(model: nn.Module) -> int:
    projection = getattr(model, "text_projection", None)
    return int(projection.shape[-1]) if isinstance(projection, torch.Tensor) else int(model.visual.output_dim)



class ConDULoRA(ContinualDecouplingUnifying):
    """``condu`` with ``variant: lora`` by default: ConDU's LoRA recipe (scripts/MTIL_LoRA.sh)
    has learning rates of its own, so it is a method (and recipe) of its own name."""

    name = "condu_lora"

    def __init__(self, variant: str = "lora", rank: int = 64, top_k: int = 4, task_agnostic: bool = False,
                 label_smoothing: float = 0.2) -> None:
        super().__init__(variant, rank, top_k, task_agnostic, label_smoothing)
