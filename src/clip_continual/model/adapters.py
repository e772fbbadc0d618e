"""The plumbing every parameter-efficient adapter shares: the recipe a model carries, the
towers it adapts, and a registry of adapter kinds that builds them.

An adapted model carries its recipe (a small dict of plain values) in the attribute
``adapter_recipe``. A checkpoint stores the recipe next to the state dict, and loading applies
the recipe to a fresh model before the weights (``checkpoints.model_from_checkpoint``), so an
adapted model loads back adapted. ``clip.set_trainable_parts`` trains only the adapters of an
adapted model: its backbone stays bit-for-bit frozen (unless its kind trains the backbone, as
ConDU's full fine-tuning does).

The kinds themselves belong to their methods (``methods/rkr.py``, ``methods/moe_adapters.py``,
``methods/rail.py``, ``methods/lora.py``, ``methods/condu.py``), which register them here with
``register_adapter_kind``. Every kind adapts the residual blocks
of the towers named by ``towers`` (``visual``, ``text``), following the towers the reference
code adapts for its ``part`` setting (wm: both).

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch import nn

RECIPE_ATTRIBUTE = "adapter_recipe"
TOWERS_OF_PARTS = {"wm": ("visual", "text"), "io": ("visual",), "to": ("text",)}


class AdapterError(ValueError):
    """Adapters cannot be added or do not fit the model."""


@dataclass(frozen=True)
class AdapterKind:
    """``add(model, recipe)`` adds the adapters in place; ``parameters(transformer)`` lists the
    trainable adapter parameters within one tower's transformer, in module order;
    ``trains_backbone(recipe)``: the model trains as a plain CLIP does (its parts), not only
    through the adapters (ConDU's full fine-tuning)."""

    add: Callable[[nn.Module, dict[str, Any]], None]
    parameters: Callable[[nn.Module], list[nn.Parameter]]
    settings: tuple[str, ...] = ()  # recipe entries that may change between tasks
    trains_backbone: Callable[[dict[str, Any]], bool] = lambda recipe: False


ADAPTER_KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(name: str, add: Callable[[nn.Module, dict[str, Any]], None],
                          parameters: Callable[[nn.Module], list[nn.Parameter]],
                          settings: tuple[str, ...] = (),
                          trains_backbone: Callable[[dict[str, Any]], bool] = lambda recipe: False) -> None:
    ADAPTER_KINDS[name] = AdapterKind(add, parameters, tuple(settings), trains_backbone)


def adapter_kind(name: Any) -> AdapterKind:
    if name not in ADAPTER_KINDS:
        # A checkpoint may be loaded before any method module (which registers its kind) is.
        importlib.import_module("clip_continual.methods")
    if name not in ADAPTER_KINDS:
        raise AdapterError(f"unknown adapter kind {name!r}; known: {', '.join(sorted(ADAPTER_KINDS))}")
    return ADAPTER_KINDS[name]


def adapter_recipe(model: nn.Module) -> dict[str, Any] | None:
    """The recipe of the adapters ``model`` carries, or None for a plain CLIP."""
    return getattr(model, RECIPE_ATTRIBUTE, None)


def tower_transformers(model: nn.Module, towers: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    """The transformer of each named tower (``visual``: the image tower, ``text``)."""
    found = {}
    for tower in towers:
        owner = model.visual if tower == "visual" else model if tower == "text" else None
        if owner is None:
            raise AdapterError(f"unknown tower '{tower}': use visual and/or text")
        transformer = getattr(owner, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise AdapterError(f"the {tower} tower of this model has no transformer blocks to adapt")
        found[tower] = transformer
    return found


def add_adapters(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Add the adapters ``recipe`` describes to ``model`` in place (idempotent for an equal
    recipe); a model that carries other adapters is refused."""
    current = adapter_recipe(model)
    if current is not None:
        if _structure(current) != _structure(recipe):
            raise AdapterError(
                f"the model already carries {current['kind']} adapters on {current['towers']}; "
                f"start from a plain CLIP to train {recipe['kind']} on {recipe['towers']}"
            )
        return model
    adapter_kind(recipe.get("kind")).add(model, recipe)
    setattr(model, RECIPE_ATTRIBUTE, {**recipe, "towers": list(recipe["towers"])})
    return model


def _structure(recipe: dict[str, Any]) -> dict[str, Any]:
    """What must match for a model's adapters to continue under a recipe: all but the kind's
    settings (a MoE model gains routers task by task)."""
    settings = adapter_kind(recipe.get("kind")).settings
    return {key: list(value) if key == "towers" else value
            for key, value in recipe.items() if key not in settings}


ROUTING_ATTRIBUTE = "task_selector"


def image_routing(model: nn.Module) -> Any | None:
    """The module that picks a task for each chunk of images (MoE-Adapters' DDAS), when the
    model carries one that knows a task; else None. Its protocol: ``routes()`` lists the routes
    an image may take, ``text_route(model, route)`` is a context in which the text tower
    encodes as that route does, and after an image forward ``last_routes`` holds each image's
    route. Evaluation encodes class texts per route and scores each image against its route's."""
    routing = getattr(getattr(model, "visual", None), ROUTING_ATTRIBUTE, None)
    return routing if routing is not None and routing.active else None


CLASSIFIER_ATTRIBUTE = "image_classifier"


def image_classifier(model: nn.Module) -> Any | None:
    """The module that classifies image features in place of the plain cosine argmax (RAIL's
    fitted classifier fused with zero-shot CLIP), when the model carries one that learnt some
    classes; else None. Its protocol: ``scores(image_feats, class_feats, class_names)`` gives
    (B, C) scores of normalised image features among the candidate classes, named by
    ``class_names`` with text features ``class_feats``. Evaluation passes the names of the
    classes it classifies among (``evaluation.features.class_features``)."""
    classifier = getattr(model, CLASSIFIER_ATTRIBUTE, None)
    return classifier if classifier is not None and classifier.active else None
ENSEMBLE_ATTRIBUTE = "task_experts"


def evaluation_ensemble(model: nn.Module) -> Any | None:
    """The task experts that encode for ``model`` at evaluation (ConDU's, ``methods/condu.py``):
    in eval mode, once a task is learnt; else None. Their protocol: ``encode_images(model,
    pixels, normalize)`` and ``encode_text(model, tokens, normalize)`` replace the model's
    encoders (features of ``tasks + 1`` blocks), and the evaluated task (``evaluated_task``)."""
    experts = getattr(model, ENSEMBLE_ATTRIBUTE, None)
    return experts if experts is not None and experts.ready and not model.training else None


def adapter_parameters(model: nn.Module, towers: tuple[str, ...] | list[str]) -> list[nn.Parameter]:
    """The trainable adapter parameters within ``towers`` (frozen MoE experts excluded)."""
    recipe = adapter_recipe(model)
    if recipe is None:
        return []
    kind = adapter_kind(recipe["kind"])
    chosen: list[nn.Parameter] = []
    for transformer in tower_transformers(model, [t for t in towers if t in recipe["towers"]]).values():
        chosen += kind.parameters(transformer)
    return chosen


# --- the task identity evaluation hands to a model -------------------------------------------

EVALUATED_TASK_ATTRIBUTE = "evaluated_task"


@dataclass(frozen=True)
class EvaluatedTask:
    """What the evaluation tells a model about the work in progress, as positions in the
    benchmark's task order (0 = its first task). ``images``: the task the test images under
    evaluation belong to, set while they are encoded and while their classifier's class texts
    are; None when the protocol hides it (``evaluation.task_identity: hidden``). ``classes``:
    the task whose class names the text tower is encoding (part of the classifier, so known
    under every protocol); None while images are encoded."""

    images: int | None = None
    classes: int | None = None
    # The label space the images are classified in (``evaluation.protocols``) and the datasets
    # whose classes are the candidates: what the protocol states, known under every protocol
    # (DPW's ODCL-CIL rule depends on it).
    label_space: str = "own"
    candidates: tuple[int, ...] = ()
    # The test batches mix the images of several tasks (one test set over every phase's classes:
    # the embedded digits, class-incremental CIFAR-100), so a rule that votes over a batch of one
    # task's images (DIKI's and DPW's batch-wise prompt, MoE-Adapters' DDAS chunks) must decide
    # for each image alone.
    mixed_batches: bool = False


def evaluated_task(model: nn.Module) -> EvaluatedTask:
    """What a module of ``model`` may know during an evaluation forward (``EvaluatedTask``);
    outside one, and for images under hidden task identity, nothing (``images`` None). A method
    whose inference rule needs the task of its test images reads ``images`` here and declares
    ``task_identity = "required"`` (``methods.base.ContinualMethod``), so that a hidden protocol
    refuses it before any work."""
    return getattr(model, EVALUATED_TASK_ATTRIBUTE, None) or EvaluatedTask()


@contextlib.contextmanager
def evaluating_task(model: nn.Module, task: EvaluatedTask) -> Iterator[None]:
    """``evaluated_task(model)`` is ``task`` for the block, and back to what it was after; the
    image tower reads it too (its routing hooks see the tower alone)."""
    owners = [model, *([model.visual] if isinstance(getattr(model, "visual", None), nn.Module) else [])]
    previous = [getattr(owner, EVALUATED_TASK_ATTRIBUTE, None) for owner in owners]
    for owner in owners:
        setattr(owner, EVALUATED_TASK_ATTRIBUTE, task)
    try:
        yield
    finally:
        for owner, value in zip(owners, previous):
            setattr(owner, EVALUATED_TASK_ATTRIBUTE, value)


def class_block_weight(model: nn.Module, dataset: int) -> Any:
    """The factor of dataset ``dataset``'s class features in a pooled classifier under the text
    route in force (DPW's ODCL-CIL: that task's Gaussian confidence); 1 for any other model."""
    routing = image_routing(model)
    weight = getattr(routing, "class_weight", None)
    return 1.0 if weight is None else weight(dataset)
