"""Evaluation of the field's benchmarks after each step: MTIL and class-incremental learning.

- **MTIL** (ZSCL): after step t every dataset's test set is classified among that dataset's own
  classes, with all its prompt templates; R[t][i] is the accuracy on dataset i (row 0 = the
  starting model). Transfer / Avg / Last as ZSCL computes them (``mtil/results.ipynb``,
  ``statistics``): Transfer = mean over i >= 2 of mean over 1 <= t < i of R[t][i]; Avg = mean of
  R[t][i] over t, i >= 1; Last = mean over i of R[T][i]. After step t < T the same formulas over
  the rows so far give the curves MLflow draws. The same matrix and metrics serve the
  protocols of ``evaluation.protocols`` (task-agnostic MTIL, ODCL-CIL, X-TAIL): they change
  what the model is told and the classes an image competes among, not the metrics.
- **Class-incremental** (ZSCL ``cil/main.py``): after step t the test images of every class seen
  so far are classified among those classes; ``cil_acc`` is that top-1. Avg = mean of
  ``cil_acc`` over steps 1..T, Last = ``cil_acc`` after step T. R[t][i] is the accuracy on the
  classes of phase i among the classes visible then (seen so far, or phases 1..i for a phase not
  yet learnt).

Image features are computed once per test set and step (large batches, inference mode, mixed
precision on GPU) and class-text features once per dataset and step.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from clip_continual.data.loading import LoaderConfig
from clip_continual.evaluation.features import (
    ClassFeatures, class_features, class_rows, evaluating, image_features_and_routes,
)
from clip_continual.evaluation.metrics import bwt_at, ut_acc
from clip_continual.evaluation.protocols import EvaluationProtocol, candidate_datasets, class_offsets
from clip_continual.evaluation.zero_shot import (
    check_class_prompts, predict, predict_images, template_class_features, top1_accuracy, zero_shot_classifier,
)
from clip_continual.model.adapters import EvaluatedTask, class_block_weight, evaluating_task
from clip_continual.model.clip import ClipModel


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def mtil_partial_metrics(rows: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """Transfer / Avg / Last over the rows 0..t available (None where undefined). With all
    T + 1 rows they are ZSCL's numbers (row 0, the starting model, enters none of them)."""
    R = np.asarray(rows, dtype=float)
    t = R.shape[0] - 1
    if t < 1:
        return {"transfer": None, "avg": None, "last": None}
    per_dataset = [R[1:min(t, i - 1) + 1, i - 1].mean() for i in range(2, R.shape[1] + 1)]
    return {"transfer": _mean_or_none(per_dataset), "avg": float(R[1:].mean()), "last": float(R[t].mean())}


def _checked_rows(previous_rows: Sequence[Sequence[float]] | None, step: int, width: int) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in (previous_rows or [])]
    if len(rows) != step or any(len(row) != width for row in rows):
        raise ValueError(f"step {step} needs the {step} earlier acc rows of {width} entries each, got "
                         f"{len(rows)} rows")
    return rows


def _sequence_metrics(step: int, task: str, acc_row: list[float], rows: list[list[float]]) -> dict[str, Any]:
    """The columns every benchmark reports: UT-Acc on what was learnt, ZS-Acc on what was not."""
    matrix = np.asarray(rows + [acc_row])
    return {
        "step": step,
        "task": str(task),
        "ut_acc": ut_acc(matrix, step),
        "zs_acc": _mean_or_none(acc_row[step:]),
        "a_acc": float(np.mean(acc_row)),
        "bwt": bwt_at(matrix, step),
        "acc_row": acc_row,
        "acc_rows": rows + [acc_row],
    }


def evaluate_datasets_step(
    clip: ClipModel, step: int, task: str,
    test_sets: Mapping[str, tuple[Any, Sequence[str]]],
    batch_size: int, device: str | torch.device | None = None,
    previous_rows: Sequence[Sequence[float]] | None = None,
    loader: LoaderConfig | None = None,
    protocol: EvaluationProtocol | None = None,
) -> dict[str, Any]:
    """MTIL after ``step``: ``test_sets`` maps each task's name (in task order) to its test set and
    prompt templates. ``protocol`` (``evaluation.protocols``; default ZSCL's MTIL) says what the
    model is told of each test set's task and which classes its images are classified among.
    Keys: step, task, acc/<name> per dataset, acc_row, acc_rows (rows 0..step), acc_columns,
    ut_acc (datasets trained so far; all at step 0), zs_acc (datasets not trained yet), a_acc
    (all), bwt, and transfer / avg / last over the rows so far."""
    step = int(step)
    rows = _checked_rows(previous_rows, step, len(test_sets))
    with evaluating(clip, device) as target:
        pooled = pooled_predictions(clip, step, list(test_sets.values()), protocol or EvaluationProtocol(),
                                    batch_size, target, loader)
    acc_row = [top1_accuracy(predictions, labels) for predictions, labels in pooled]
    result = _sequence_metrics(step, task, acc_row, rows)
    result["acc_columns"] = list(test_sets)
    result.update({f"acc/{name}": value for name, value in zip(test_sets, acc_row)})
    result.update(mtil_partial_metrics(result["acc_rows"]))
    return result


def pooled_predictions(
    clip: ClipModel, step: int, sets: Sequence[tuple[Any, Sequence[str]]], protocol: EvaluationProtocol,
    batch_size: int, target: torch.device, loader: LoaderConfig | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dataset (in task order) each test image's predicted class and its label, both as rows
    of the pooled label space (dataset i's classes from ``offsets[i]`` on), each image classified
    among the classes ``protocol.label_space`` gives it after ``step``, the model told its task
    only under ``task_identity: given``. The caller holds eval mode on ``target``."""
    offsets = class_offsets([len(images.class_names) for images, _ in sets])
    classifiers: dict[tuple[tuple[int, ...], int | None], ClassFeatures] = {}
    pooled = []
    for dataset, (images, _) in enumerate(sets):
        blocks = candidate_datasets(protocol.label_space, step, dataset, len(sets))
        image_task = protocol.image_task(dataset)
        if (blocks, image_task) not in classifiers:  # shared by the datasets with the same candidates
            classifiers[blocks, image_task] = _pooled_classifier(clip, sets, blocks, image_task, batch_size, target,
                                                                 protocol.label_space)
        told = EvaluatedTask(images=image_task, label_space=protocol.label_space, candidates=blocks)
        with evaluating_task(clip.model, told):
            picks = predict_images(clip, images, classifiers[blocks, image_task], batch_size, target, loader)
        # the candidates are consecutive pooled rows, from the first candidate dataset's on
        pooled.append((offsets[blocks[0]] + picks, offsets[dataset] + np.asarray(images.labels)))
    return pooled


def _pooled_classifier(clip: ClipModel, sets: Sequence[tuple[Any, Sequence[str]]], blocks: tuple[int, ...],
                       image_task: int | None, batch_size: int, target: torch.device,
                       label_space: str = "own") -> ClassFeatures:
    """The classes of datasets ``blocks`` (consecutive, in task order) stacked, each dataset's
    from its own templates while the model may read whose class names they are, times the
    weight the model's text route gives that dataset's block (``adapters.class_block_weight``)."""
    for dataset in blocks:
        check_class_prompts(sets[dataset][0].class_names, sets[dataset][1])

    def compute() -> torch.Tensor:
        features = []
        for dataset in blocks:
            images, templates = sets[dataset]
            told = EvaluatedTask(images=image_task, classes=dataset, label_space=label_space, candidates=blocks)
            with evaluating_task(clip.model, told):
                block = template_class_features(clip, images.class_names, templates, batch_size, target)
                features.append(block * class_block_weight(clip.model, dataset))
        return torch.cat(features)
    names = [name for dataset in blocks for name in sets[dataset][0].class_names]
    return class_features(clip, compute, names)


def _visible_classes(phases: Sequence[Sequence[int]], step: int, phase: int) -> list[int]:
    """Classes a test image of ``phase`` is classified among after ``step``: those seen so far,
    or, for a phase not learnt yet, those of phases 1..phase (what that step will face)."""
    return sorted({c for p in phases[:max(step, phase + 1)] for c in p})


def _accuracy_among(features: torch.Tensor, routes: torch.Tensor | None, labels: np.ndarray,
                    class_feats: ClassFeatures, candidates: list[int], mask: np.ndarray) -> float:
    rows = torch.from_numpy(mask).to(features.device)
    picks = predict(features[rows], class_rows(class_feats, candidates),
                    None if routes is None else routes[rows.to(routes.device)])
    return top1_accuracy(np.asarray(candidates)[picks], labels[mask])


def evaluate_class_incremental_step(
    clip: ClipModel, step: int, task: str, test_set: Any, templates: Sequence[str],
    phases: Sequence[Sequence[int]], batch_size: int, device: str | torch.device | None = None,
    previous_rows: Sequence[Sequence[float]] | None = None, loader: LoaderConfig | None = None,
) -> dict[str, Any]:
    """Class-incremental learning after ``step``. Keys as ``evaluate_datasets_step`` (columns =
    phases) plus ``cil_acc``: top-1 on the test images of the classes seen so far among those
    classes (step 0: the first phase's classes, the starting model's zero-shot)."""
    step = int(step)
    rows = _checked_rows(previous_rows, step, len(phases))
    labels = np.asarray(test_set.labels)
    with evaluating(clip, device) as target, evaluating_task(clip.model, EvaluatedTask(mixed_batches=True)):
        class_feats = zero_shot_classifier(clip, test_set.class_names, templates, batch_size, target)
        features, routes = image_features_and_routes(clip, test_set, batch_size, target, loader)
        acc_row = [
            _accuracy_among(features, routes, labels, class_feats, _visible_classes(phases, step, i),
                            np.isin(labels, phase))
            for i, phase in enumerate(phases)
        ]
        seen = _visible_classes(phases, step, 0)
        cil_acc = _accuracy_among(features, routes, labels, class_feats, seen, np.isin(labels, seen))
    result = _sequence_metrics(step, task, acc_row, rows)
    result["acc_columns"] = [f"phase_{i}" for i in range(1, len(phases) + 1)]
    result["cil_acc"] = cil_acc
    return result


def class_incremental_summary(step_results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """ZSCL's class-incremental Avg (mean of ``cil_acc`` over steps 1..T) and Last."""
    ordered = sorted(step_results, key=lambda result: int(result["step"]))
    accuracies = [float(result["cil_acc"]) for result in ordered if int(result["step"]) >= 1]
    if not accuracies:
        raise ValueError("class-incremental Avg and Last need the results of steps 1..T")
    return {"avg": float(np.mean(accuracies)), "last": accuracies[-1]}
