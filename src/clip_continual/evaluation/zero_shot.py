"""Zero-shot classification: class features from prompt templates, predictions, and the
accuracies built on them (top-1, per class, per phase, among the classes seen so far).

Plain Python, NumPy and PyTorch; no Kedro import. Every accuracy is a fraction in [0, 1].
UT-Acc after step t is the mean over phases i <= t of the mean per-class accuracy on phase i's
classes, every image classified among ALL class prompts of the updated task (step 0, the
starting model: mean over all phases); ZS-Acc is the top-1 accuracy on a held-out set, class
features averaged over prompt templates (definitions of PAPER.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import LoaderConfig
from clip_continual.evaluation.features import (
    DEFAULT_BATCH_SIZE, ClassFeatures, EvalImages, FittedClasses, RoutedClasses, as_float_tensor, class_features,
    class_rows, evaluating, forget_routes, routed_feature_batches, routed_scores, similarity_scores, text_features,
)
from clip_continual.model.clip import ClipModel


def fill_template(template: str, class_name: str) -> str:
    """``template`` with the class name in its placeholder: ``{}``, ``{name}``, ``{label}`` or ``{classname}``."""
    try:
        prompt = template.format(class_name, name=class_name, label=class_name,
                                 classname=class_name, class_name=class_name)
    except (IndexError, KeyError) as error:
        raise ValueError(
            f"prompt template '{template}' has an unknown placeholder ({error}); use '{{}}' or '{{name}}'"
        ) from error
    if prompt == template:
        raise ValueError(
            f"prompt template '{template}' has no placeholder for the class name, e.g. 'a photo of a {{}}.'"
        )
    return prompt


def zero_shot_classifier(
    clip: ClipModel, class_names: Sequence[str], templates: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
) -> ClassFeatures:
    """(C, D) class features: per class, the mean of its normalised template prompts,
    renormalised (per route for a model that routes its images, ``RoutedClasses``; with the
    names for a model with its own classifier, ``FittedClasses``)."""
    check_class_prompts(class_names, templates)
    return class_features(clip, lambda: template_class_features(clip, class_names, templates, batch_size, device),
                          class_names)


def check_class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> None:
    if len(class_names) == 0:
        raise ValueError("zero_shot_classifier needs at least one class name")
    if len(templates) == 0:
        raise ValueError("zero_shot_classifier needs at least one prompt template")



def template_class_features(
    clip: ClipModel, class_names: Sequence[str], templates: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
) -> torch.Tensor:
    """(C, D) per class the mean of its normalised template prompts, renormalised, as the text
    tower gives them now (one route; ``zero_shot_classifier`` covers every route)."""
    prompts = [fill_template(template, name) for name in class_names for template in templates]
    features = text_features(clip, prompts, batch_size, device)
    per_class = features.view(len(class_names), len(templates), -1).mean(dim=1)
    # Features of several models side by side (ConDU's experts): each renormalised alone.
    blocks = features.shape[-1] // int(clip.model_config["embed_dim"])
    if blocks > 1:
        per_class = F.normalize(per_class.view(len(class_names), blocks, -1), dim=-1).flatten(1)
    return F.normalize(per_class, dim=-1)


# --- classification ---------------------------------------------------------------------------

def predict(image_feats: torch.Tensor | np.ndarray, class_feats: ClassFeatures | np.ndarray,
            routes: torch.Tensor | None = None) -> np.ndarray:
    """Index of the most similar class for each image; an exact tie goes to the lowest index.
    Class features per route (``RoutedClasses``) score each image under its ``routes`` entry;
    a model's own classifier (``FittedClasses``) scores them as it does."""
    images = as_float_tensor(image_feats)
    if isinstance(class_feats, FittedClasses):
        return torch.nan_to_num(class_feats.scores(images), nan=-torch.inf).argmax(dim=1).cpu().numpy().astype(np.int64)
    if isinstance(class_feats, RoutedClasses):
        return routed_scores(images, routes, class_feats).argmax(dim=1).cpu().numpy().astype(np.int64)
    classes = as_float_tensor(class_feats, images.device)
    if images.ndim != 2 or classes.ndim != 2 or images.shape[1] != classes.shape[1]:
        raise ValueError(
            f"expected image features (N, D) and class features (C, D), got {tuple(images.shape)} "
            f"and {tuple(classes.shape)}"
        )
    if classes.shape[0] == 0:
        raise ValueError("cannot classify among zero classes")
    return similarity_scores(images, classes).argmax(dim=1).cpu().numpy().astype(np.int64)


def _on_device(class_feats: ClassFeatures, device: torch.device) -> ClassFeatures:
    if isinstance(class_feats, FittedClasses):
        return class_feats.to(device)
    return class_feats if isinstance(class_feats, RoutedClasses) else as_float_tensor(class_feats, device)


def predict_images(
    clip: ClipModel, images: EvalImages, class_feats: ClassFeatures,
    batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
    loader: LoaderConfig | None = None,
) -> np.ndarray:
    """Predicted class of each image, streaming batches so no (N, D) feature matrix is kept."""
    with evaluating(clip, device) as target, torch.inference_mode():
        classes = _on_device(class_feats, target)
        predictions = []
        for batch, routes in routed_feature_batches(clip, images, batch_size, loader):
            predictions.append(predict(batch, classes, routes))
            forget_routes([classes], routes)
    return np.concatenate(predictions) if predictions else np.empty(0, dtype=np.int64)


def _check_predictions(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions and labels must be 1-D of equal length, got {predictions.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined: the evaluation set has no images")
    return predictions, labels


def top1_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose prediction equals the label."""
    predictions, labels = _check_predictions(predictions, labels)
    return float(np.mean(predictions == labels))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) accuracy of each class's images; NaN for a class without images."""
    predictions, labels = _check_predictions(predictions, labels)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    correct = np.bincount(labels, weights=(predictions == labels).astype(float), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, correct / counts, np.nan)


def check_phases(phases: Sequence[Sequence[int]], num_classes: int | None = None) -> list[list[int]]:
    checked = [[int(c) for c in phase] for phase in phases]
    if not checked or any(len(phase) == 0 for phase in checked):
        raise ValueError(f"phases must be a non-empty list of non-empty class-id lists, got {phases}")
    ids = [c for phase in checked for c in phase]
    if min(ids) < 0 or (num_classes is not None and max(ids) >= num_classes):
        raise ValueError(f"phase class ids must lie in [0, {num_classes}), got [{min(ids)}, {max(ids)}]")
    return checked


def phase_accuracies(predictions: np.ndarray, labels: np.ndarray, phases: Sequence[Sequence[int]]) -> list[float]:
    """For each phase, the mean per-class accuracy over its classes (classes without images skipped).

    ``predictions`` come from classification among ALL classes, so confusing a class with one of
    another phase counts as an error.
    """
    phases = check_phases(phases)
    labels = np.asarray(labels)
    num_classes = max(max(c for phase in phases for c in phase), int(labels.max(initial=-1))) + 1
    accuracy = per_class_accuracy(predictions, labels, num_classes)
    result = []
    for number, phase in enumerate(phases, start=1):
        present = accuracy[phase][~np.isnan(accuracy[phase])]
        if len(present) == 0:
            raise ValueError(f"phase {number} (classes {phase}) has no test images; its accuracy is undefined")
        result.append(float(present.mean()))
    return result


def seen_classes(phases: Sequence[Sequence[int]], step: int) -> list[int]:
    """The classes learnt by ``step`` (phases 1..step); at step 0, before any, every class."""
    phases = check_phases(phases)
    learnt = phases[:step] if step > 0 else phases
    return sorted({c for phase in learnt for c in phase})


def seen_accuracy(seen_predictions: np.ndarray, labels: np.ndarray, seen: Sequence[int]) -> float:
    """Top-1 accuracy on the images of the ``seen`` classes, given each image's prediction
    among the seen classes only: what class-incremental papers report after each session."""
    labels = np.asarray(labels)
    rows = np.isin(labels, np.asarray(seen))
    return top1_accuracy(np.asarray(seen_predictions)[rows], labels[rows])


def seen_class_accuracy(image_feats: torch.Tensor, labels: np.ndarray, class_feats: torch.Tensor,
                        seen: Sequence[int]) -> float:
    """``seen_accuracy`` from image and class features held in memory."""
    seen = np.asarray(sorted(seen), dtype=np.int64)
    among_seen = predict(image_feats, class_feats[torch.from_numpy(seen).to(class_feats.device)])
    return seen_accuracy(seen[among_seen], labels, seen)


def predictions_among(
    clip: ClipModel, images: EvalImages, class_feats: ClassFeatures, subsets: Sequence[Sequence[int] | None],
    batch_size: int, loader: LoaderConfig | None,
) -> list[np.ndarray]:
    """Each image's class among each subset of the classes (None: all of them), in one
    streaming pass (no (N, D) feature matrix kept); the caller holds eval mode."""
    chosen = [None if subset is None else np.asarray(sorted(subset), dtype=np.int64) for subset in subsets]
    predicted: list[list[np.ndarray]] = [[] for _ in chosen]
    with torch.inference_mode():
        classes = _on_device(class_feats, clip.device)
        rows = [classes if subset is None else class_rows(classes, subset) for subset in chosen]
        for batch, routes in routed_feature_batches(clip, images, batch_size, loader):
            for found, subset, subset_feats in zip(predicted, chosen, rows):
                indices = predict(batch, subset_feats, routes)
                found.append(indices if subset is None else subset[indices])
            forget_routes([classes, *rows], routes)
    empty = np.empty(0, dtype=np.int64)
    return [np.concatenate(found) if found else empty for found in predicted]


def zero_shot_accuracy(
    clip: ClipModel,
    image_set: ImageSet | Any,
    templates: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    loader: LoaderConfig | None = None,
) -> float:
    """Top-1 accuracy of zero-shot classification among ``image_set``'s class names."""
    with evaluating(clip, device) as target:
        classes = zero_shot_classifier(clip, image_set.class_names, templates, batch_size, target)
        predictions = predict_images(clip, image_set, classes, batch_size, target, loader)
    return top1_accuracy(predictions, image_set.labels)
