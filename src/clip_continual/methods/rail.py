"""RAIL: regression-based analytic incremental learning on a frozen CLIP.

Follows RAIL (Xu et al., NeurIPS 2024, arXiv 2406.18868), code
``linghan1997/Regression-based-Analytic-Incremental-Learning``: ``primal_RAIL.py``
(``continual_clip_adaptor``: random-feature expansion, ``analytic_adaption``, the fused evaluation
loop), ``dual_RAIL.py`` (kernel ridge on the stored features), ``utils.py`` (``kernel``,
``kernel_ridge_regression``) and ``configs/analytic_clip.yaml`` (the defaults). No gradient
reaches CLIP: a classifier is solved in closed form on the frozen, normalised image features.

- ``primal``: ``phi = relu(P f)`` with a fixed random ``P`` (hidden_dim x D), then ridge
  regression onto one-hot targets. The first task solves ``R = (Phi^T Phi + gamma I)^-1`` and
  ``W = R Phi^T Y``; each later batch updates ``R`` and ``W`` recursively (Woodbury), new classes
  as zero columns, so ``W`` always equals the joint ridge solution on every image seen so far.
- ``dual``: every training feature is kept; after each task Gaussian-kernel ridge regression is
  solved again on all of them: ``alpha = (K + lambda I)^-1 Y``.

Inference (both): zero-shot CLIP probabilities ``softmax(100 cos)`` over the candidate classes;
where the most probable class is a learnt one, ``(1 - w) p_zs + w a``, ``a`` the regression
outputs placed on the candidate classes (zero for classes not learnt). Upstream's candidates are
the union of every domain's classes (X-TAIL); here they are whatever classes the evaluation
classifies among (a dataset's own classes in MTIL, all of them in a pooled-class protocol), and
a learnt class is matched to a candidate by its class name.

The classifier lives in the model as an adapter kind ("rail", ``model.adapters``), so a
checkpoint carries it and evaluation uses it (``model.adapters.image_classifier``). The primal
``R`` (hidden_dim^2) is handed from task to task as the method's state.

Not taken over: ``eval_adapter: 1`` (the config default) skips the test sets of domains not yet
learnt, leaving the upper triangle of the accuracy matrix empty (Transfer undefined, Average
biased by the zeros). It changes no prediction, only which cells are measured; the pipeline always
measures the whole matrix, as upstream's ``eval_adapter: 0``.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_continual.methods.base import Batch, ContinualMethod, MethodConfigError, TaskContext, image_features
from clip_continual.model.adapters import (
    CLASSIFIER_ATTRIBUTE, adapter_recipe, add_adapters, register_adapter_kind,
)

logger = logging.getLogger(__name__)

VARIANTS = ("primal", "dual")
ZERO_SHOT_SCALE = 100.0  # primal_RAIL.py:115 and dual_RAIL.py:166: 100 * features @ clip_weights
STATE_KEY = "ridge_inverse"  # the primal R handed to the next task


# --- the mathematics, on plain tensors ----------------------------------------------------------

def draw_projection(hidden_dim: int, feature_dim: int, seed: int) -> torch.Tensor:
    """The fixed random expansion (hidden_dim, feature_dim): nn.Linear's default initialisation,
    U(-1/sqrt(D), 1/sqrt(D)), as primal_RAIL.py:30-33 builds it (bias-free), from its own seed."""
    generator = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(feature_dim)
    return (torch.rand(hidden_dim, feature_dim, generator=generator) * 2.0 - 1.0) * bound


class RecursiveRidge:
    """Ridge regression learnt chunk by chunk, as ``analytic_adaption`` (primal_RAIL.py:41-104).

    Without ``inverse`` (the first task) the chunks' correlations are summed and ``finish`` solves
    ``R = (Phi^T Phi + gamma I)^-1`` (in float64, as upstream's ``np.mat(...).I``) and ``W = R
    Phi^T Y``. With ``inverse`` every chunk updates both at once (Woodbury):
    ``R <- R - R Phi^T (I + Phi R Phi^T)^-1 Phi R``, ``W <- W + R Phi^T (Y - Phi W)``.
    """

    def __init__(self, gamma: float, inverse: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        self.gamma = float(gamma)
        self.inverse, self.weight = inverse, weight
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None

    def add_columns(self, count: int) -> None:
        """New classes: zero columns (primal_RAIL.py:80)."""
        for name in ("weight", "cross"):
            value = getattr(self, name)
            if value is not None and count > 0:
                setattr(self, name, torch.cat([value, value.new_zeros(value.shape[0], count)], dim=1))

    def observe(self, phi: torch.Tensor, targets: torch.Tensor) -> float | None:
        """Learn one chunk (rows of ``phi`` with their one-hot ``targets``); returns the chunk's
        mean squared residual before its update (None while the first task's sums are kept)."""
        if self.inverse is None:
            if self.gram is None:
                self.gram = phi.new_zeros(phi.shape[1], phi.shape[1])
                self.cross = phi.new_zeros(phi.shape[1], targets.shape[1])
            self.gram += phi.T @ phi
            self.cross += phi.T @ targets
            return None
        residual = targets - phi @ self.weight
        projected = self.inverse @ phi.T  # R Phi^T
        inner = torch.eye(len(phi), dtype=phi.dtype, device=phi.device) + phi @ projected
        # Upstream takes torch.pinverse of this symmetric positive-definite matrix; a solve is the same.
        self.inverse = self.inverse - projected @ torch.linalg.solve(inner, projected.T)
        self.weight = self.weight + self.inverse @ phi.T @ residual
        return float(residual.square().mean())

    def finish(self) -> None:
        """Close the first task: the inverse and the weights of the summed chunks."""
        if self.inverse is not None or self.gram is None:
            return
        eye = torch.eye(len(self.gram), dtype=torch.float64, device=self.gram.device)
        self.inverse = torch.linalg.inv(self.gram.double() + self.gamma * eye).to(self.gram.dtype)
        self.weight = self.inverse @ self.cross
        self.gram = self.cross = None


def ridge_solution(phi: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """The joint ridge solution ``(Phi^T Phi + gamma I)^-1 Phi^T Y``, for checks."""
    eye = torch.eye(phi.shape[1], dtype=phi.dtype, device=phi.device)
    return torch.linalg.solve(phi.T @ phi + gamma * eye, phi.T @ targets)


def gaussian_kernel(x: torch.Tensor, centres: torch.Tensor, gamma: float) -> torch.Tensor:
    """``exp(-gamma |x - c|^2)`` (utils.py ``kernel``), (len(x), len(centres))."""
    return torch.exp(-gamma * torch.cdist(x, centres).square())


def kernel_ridge(features: torch.Tensor, targets: torch.Tensor, gamma: float, regularization: float) -> torch.Tensor:
    """``alpha = (K + lambda I)^-1 Y`` in float64 (utils.py ``kernel_ridge_regression.train``)."""
    kernel = gaussian_kernel(features, features, gamma).double()
    eye = torch.eye(len(kernel), dtype=torch.float64, device=kernel.device)
    return torch.linalg.solve(kernel + regularization * eye, targets.double())


def fuse(zero_shot: torch.Tensor, adapter: torch.Tensor, learnt: torch.Tensor, weight: float) -> torch.Tensor:
    """RAIL's inference rule (primal_RAIL.py:253-273): ``zero_shot`` are probabilities over the
    candidate classes, ``adapter`` the regression outputs placed on them (zero where a class is not
    learnt), ``learnt`` which candidates are learnt. Rows whose most probable class is learnt get
    ``(1 - weight) zero_shot + weight adapter``; the others keep the zero-shot probabilities."""
    in_domain = learnt[zero_shot.argmax(dim=1)]
    fused = (1.0 - weight) * zero_shot + weight * adapter
    return torch.where(in_domain.unsqueeze(1), fused, zero_shot)


# --- the classifier a RAIL model carries (an adapter kind) ----------------------------------------

class AnalyticClassifier(nn.Module):
    """The solved classifier with its class names (one column each). Primal: ``weight``
    (width, K) over the expanded features (``projection`` is redrawn from its seed, not stored);
    dual: the stored ``memory`` features, each one's class column and ``alpha`` (N, K)."""

    def __init__(self, recipe: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.variant = recipe["variant"]
        self.class_names: list[str] = [str(n) for n in recipe.get("class_names", [])]
        self.fusion_weight = float(recipe["fusion_weight"])
        self.kernel_gamma = float(recipe["kernel_gamma"])
        classes, dim = len(self.class_names), int(recipe["feature_dim"])
        if self.variant == "primal":
            width = int(recipe["hidden_dim"]) if recipe["feature_expansion"] else dim
            if recipe["feature_expansion"]:
                projection = draw_projection(width, dim, recipe["projection_seed"]).to(dtype)
                self.register_buffer("projection", projection, persistent=False)  # redrawn, not stored
            else:
                self.projection = None
            self.register_buffer("weight", torch.zeros(width, classes, dtype=dtype))
        else:
            size = int(recipe.get("memory_size", 0))
            self.register_buffer("memory", torch.zeros(size, dim, dtype=dtype))
            self.register_buffer("memory_columns", torch.zeros(size, dtype=torch.long))
            self.register_buffer("alpha", torch.zeros(size, classes, dtype=torch.float64))

    @property
    def active(self) -> bool:
        return bool(self.class_names)

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """The regression's inputs: ``relu(P f)`` (primal_RAIL.py:30-33), or ``f`` unexpanded."""
        if self.projection is None:
            return features
        return F.relu(features.to(self.projection.dtype) @ self.projection.T)

    def adapter_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K) regression outputs of normalised image features, one column per class name."""
        if self.variant == "primal":
            return self.expand(features).to(self.weight.dtype) @ self.weight
        kernel = gaussian_kernel(features.to(self.memory.dtype), self.memory, self.kernel_gamma)
        return (kernel.double() @ self.alpha).to(features.dtype)

    def scores(self, image_feats: torch.Tensor, class_feats: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """(B, C) fused scores of images among the candidate classes (``class_feats``: their
        normalised text features, ``class_names``: their names); see ``fuse``."""
        columns = {name: column for column, name in enumerate(self.class_names)}
        placed = torch.tensor([columns.get(str(name), -1) for name in class_names], device=image_feats.device)
        learnt = placed >= 0
        zero_shot = (ZERO_SHOT_SCALE * image_feats @ class_feats.T).softmax(dim=1)
        adapter = self.adapter_scores(image_feats)[:, placed.clamp(min=0)].to(zero_shot.dtype)
        return fuse(zero_shot, adapter * learnt.to(zero_shot.dtype), learnt, self.fusion_weight)


# Recipe entries that change from task to task (what was learnt, the inference weight).
SETTINGS = ("class_names", "memory_size", "fusion_weight")


def add_classifier(model: nn.Module, recipe: dict[str, Any]) -> None:
    like = next(model.parameters())
    dtype = torch.promote_types(like.dtype, torch.float32)  # float32, or float64 for a float64 model
    model.add_module(CLASSIFIER_ATTRIBUTE, AnalyticClassifier(recipe, dtype).to(like.device))


register_adapter_kind("rail", add_classifier, lambda transformer: [], settings=SETTINGS)


# --- the method -----------------------------------------------------------------------------

def _check_number(key: str, value: Any, valid: Callable[[float], bool], what: str) -> None:
    try:
        ok = not isinstance(value, bool) and valid(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MethodConfigError(f"{key} must be {what}, got {value!r}")


class Rail(ContinualMethod):
    """RAIL (module docstring): no optimiser step; the loop shows every training image
    ``augmentation_time`` times (``fit_batch``) and the classifier is solved from them.

    ``variant``: primal (ridge on ``hidden_dim`` random ReLU features, regularisation
    ``regularization``; ``feature_expansion: false`` regresses on the CLIP features themselves)
    or dual (Gaussian-kernel ridge, ``kernel_gamma``, ``kernel_regularization``, on all stored
    features). ``fusion_weight``: the regression's share where zero-shot CLIP picks a learnt
    class. ``label_smoothing`` is accepted (every method has it) and unused: there is no loss.
    """

    name = "rail"
    gradient_steps = False

    def __init__(
        self,
        variant: str = "primal",           # primal_RAIL.py | dual_RAIL.py
        hidden_dim: int = 15000,           # configs/analytic_clip.yaml hidden_dim
        regularization: float = 0.1,       # configs/analytic_clip.yaml regularization (gamma of the ridge)
        feature_expansion: bool = True,    # configs/analytic_clip.yaml feature_expansion: 1
        kernel_gamma: float = 0.1,         # configs/analytic_clip.yaml gamma (dual_RAIL.py:62)
        kernel_regularization: float = 0.001,  # dual_RAIL.py:62 lamda=0.001 (hard-coded)
        fusion_weight: float = 0.8,        # configs/analytic_clip.yaml fusion_weight
        projection_seed: int = 42,         # configs/analytic_clip.yaml seed (torch.manual_seed before the expansion)
        augmentation_time: int = 1,        # configs/analytic_clip.yaml augmentation_time (passes over the images)
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if variant not in VARIANTS:
            raise MethodConfigError(f"rail variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        for key, value in (("hidden_dim", hidden_dim), ("augmentation_time", augmentation_time)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodConfigError(f"{key} must be a positive integer, got {value!r}")
        for key, value in (("regularization", regularization), ("kernel_gamma", kernel_gamma),
                           ("kernel_regularization", kernel_regularization)):
            _check_number(key, value, lambda number: number > 0.0, "a positive number")
        _check_number("fusion_weight", fusion_weight, lambda number: 0.0 <= number <= 1.0, "a number in [0, 1]")
        self.variant, self.hidden_dim, self.regularization = variant, hidden_dim, float(regularization)
        self.feature_expansion, self.kernel_gamma = bool(feature_expansion), float(kernel_gamma)
        self.kernel_regularization, self.fusion_weight = float(kernel_regularization), float(fusion_weight)
        self.projection_seed, self.augmentation_time = int(projection_seed), augmentation_time
        self.passes = augmentation_time
        self._reset()

    def _reset(self) -> None:
        self.head: AnalyticClassifier | None = None
        self.columns: list[str] = []
        self.label_columns: torch.Tensor | None = None
        self.ridge: RecursiveRidge | None = None
        self.features: list[torch.Tensor] = []
        self.feature_columns: list[torch.Tensor] = []
        self.batches = 0
        self.state: dict[str, np.ndarray] = {}

    def prepare_student(self, student: nn.Module, parts: str) -> None:
        add_adapters(student, {
            "kind": "rail", "towers": [], "variant": self.variant, "feature_dim": int(student.visual.output_dim),
            "hidden_dim": self.hidden_dim, "feature_expansion": self.feature_expansion,
            "projection_seed": self.projection_seed, "kernel_gamma": self.kernel_gamma,
            "fusion_weight": self.fusion_weight, "class_names": [], "memory_size": 0,
        })
        adapter_recipe(student)["fusion_weight"] = self.fusion_weight  # a continued model takes this run's
        self.head = getattr(student, CLASSIFIER_ATTRIBUTE)
        self.head.fusion_weight = self.fusion_weight

    def before_task(self, task: TaskContext) -> None:
        if self.head is None:
            raise RuntimeError("rail: prepare_student must run before before_task")
        self.columns = list(self.head.class_names)
        earlier = len(self.columns)
        self.label_columns = self._label_columns(task)
        if self.variant == "primal":
            self.ridge = RecursiveRidge(self.regularization, self._handed_inverse(task, earlier),
                                        self.head.weight.clone() if earlier else None)
            self.ridge.add_columns(len(self.columns) - earlier)

    def _label_columns(self, task: TaskContext) -> torch.Tensor:
        """Global label -> classifier column; a class name learnt before keeps its column."""
        if len(task.class_names) != len(task.class_tokens):
            raise ValueError("rail needs the class names of the task (TaskContext.class_names)")
        lookup = torch.full((len(task.class_names),), -1, dtype=torch.long)
        for label in task.current_classes.tolist():
            name = str(task.class_names[label])
            if name not in self.columns:
                self.columns.append(name)
            lookup[label] = self.columns.index(name)
        return lookup.to(task.device)

    def _handed_inverse(self, task: TaskContext, earlier: int) -> torch.Tensor | None:
        if not earlier:
            return None
        stored = task.previous_state.get(STATE_KEY)
        width = self.head.weight.shape[0]
        if stored is None or tuple(stored.shape) != (width, width):
            raise ValueError(
                f"the start model carries a RAIL classifier of {earlier} classes but the previous task's "
                f"method state has no {STATE_KEY} of shape ({width}, {width}); continue from the "
                f"method_state the task that trained it wrote")
        return torch.from_numpy(np.asarray(stored)).to(task.device, self.head.weight.dtype)

    def fit_batch(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, float]:
        # Frozen CLIP, normalised (primal_RAIL.py:36-39); each worker encodes its part and the
        # classifier is updated with the global batch on every worker.
        features = task.workers.gather(image_features(student, batch.pixels))
        columns = task.workers.gather(self.label_columns[batch.labels])
        self.batches += 1
        if self.variant == "dual":
            self.features.append(features.detach().to(self.head.memory.dtype))
            self.feature_columns.append(columns)
            return {}
        phi = self.head.expand(features).to(self.head.weight.dtype)
        residual = self.ridge.observe(phi, F.one_hot(columns, len(self.columns)).to(phi.dtype))
        return {} if residual is None else {"ridge_residual": residual}

    def after_task(self, task: TaskContext, student: nn.Module) -> None:
        if not self.batches:
            return  # nothing was seen (a failure before the first batch): the model stays as it was
        head, recipe = getattr(student, CLASSIFIER_ATTRIBUTE), adapter_recipe(student)
        if self.variant == "primal":
            self.ridge.finish()
            head.weight = self.ridge.weight.detach().clone()
            self.state = {STATE_KEY: self.ridge.inverse.detach().cpu().numpy()}
        else:
            self._solve_kernel_ridge(head)
        head.class_names = list(self.columns)
        recipe["class_names"] = list(self.columns)
        recipe["memory_size"] = int(head.memory.shape[0]) if self.variant == "dual" else 0
        self.features, self.feature_columns, self.ridge, self.batches = [], [], None, 0

    def _solve_kernel_ridge(self, head: AnalyticClassifier) -> None:
        """Every feature seen so far, the new ones appended (dual_RAIL.py:111-119)."""
        memory = torch.cat([head.memory.to(self.features[0].device), *self.features])
        columns = torch.cat([head.memory_columns.to(memory.device), *self.feature_columns])
        targets = F.one_hot(columns, len(self.columns)).double()
        head.alpha = kernel_ridge(memory, targets, self.kernel_gamma, self.kernel_regularization)
        head.memory, head.memory_columns = memory, columns

    def export_state(self) -> dict[str, np.ndarray]:
        return dict(self.state)  # read more than once (the task's state file, its storage cost)

    def loss_terms(self, student: nn.Module, batch: Batch, task: TaskContext) -> dict[str, torch.Tensor]:
        raise RuntimeError("rail takes no gradient step: the loop calls fit_batch (gradient_steps = False)")
