"""Everything measured after one continual step: UT-Acc and BWT over the phases, the
accuracy on the classes seen so far, and the evaluation suite (zero-shot sets, retrieval sets).

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import LoaderConfig
from clip_continual.evaluation.features import DEFAULT_BATCH_SIZE, class_features, evaluating, text_features
from clip_continual.evaluation.metrics import bwt_at, ut_acc
from clip_continual.evaluation.retrieval import RETRIEVAL_KEYS, evaluate_retrieval
from clip_continual.evaluation.zero_shot import (
    check_phases, phase_accuracies, predictions_among, seen_accuracy, seen_classes, top1_accuracy,
    zero_shot_accuracy,
)
from clip_continual.model.adapters import EvaluatedTask, evaluating_task
from clip_continual.model.clip import ClipModel


def _earlier_rows(previous_rows: Sequence[Sequence[float]] | None, step: int, num_tasks: int) -> list[list[float]]:
    """Rows 0..step-1, needed for BWT from step 2 on (their diagonal)."""
    if step < 2:
        return []
    if previous_rows is None or len(previous_rows) != step:
        have = "none" if previous_rows is None else len(previous_rows)
        raise ValueError(
            f"step {step} needs the acc rows of steps 0..{step - 1} ({step} rows) for BWT, got {have}"
        )
    rows = [[float(v) for v in row] for row in previous_rows]
    if any(len(row) != num_tasks for row in rows):
        raise ValueError(f"every earlier acc row must have {num_tasks} entries (one per phase)")
    return rows



def _suite_metrics(
    clip: ClipModel, zero_shot_sets: Mapping[str, tuple[Any, Sequence[str]]],
    retrieval_sets: Mapping[str, tuple[Any, int]], batch_size: int, target: torch.device,
    loader: LoaderConfig | None,
) -> dict[str, Any]:
    """``zs_acc`` (mean over the zero-shot sets), the first retrieval set's recalls as the
    headline columns, and every set alone (``zs_acc/<set>``, ``retrieval/<set>/<metric>``)."""
    if not zero_shot_sets:
        raise ValueError("the evaluation suite needs at least one zero-shot set")
    metrics: dict[str, Any] = {
        f"zs_acc/{name}": zero_shot_accuracy(clip, images, templates, batch_size, target, loader)
        for name, (images, templates) in zero_shot_sets.items()
    }
    metrics["zs_acc"] = float(np.mean([metrics[f"zs_acc/{name}"] for name in zero_shot_sets]))
    headline = dict.fromkeys(RETRIEVAL_KEYS)
    for number, (name, (images, folds)) in enumerate(retrieval_sets.items()):
        recalls = evaluate_retrieval(clip, images, batch_size, target, folds, loader)
        headline = recalls if number == 0 else headline
        metrics.update({f"retrieval/{name}/{key}": value for key, value in recalls.items()})
    return {**metrics, **{key: headline[key] for key in RETRIEVAL_KEYS}}


def evaluate_step(
    clip: ClipModel,
    step: int,
    task: str,
    updated_test: ImageSet | Any,
    class_prompts: Sequence[str],
    phases: Sequence[Sequence[int]],
    zero_shot_sets: Mapping[str, tuple[Any, Sequence[str]]],
    retrieval_sets: Mapping[str, tuple[Any, int]] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    previous_rows: Sequence[Sequence[float]] | None = None,
    loader: LoaderConfig | None = None,
) -> dict[str, Any]:
    """All metrics of the model after ``step`` (0 = the starting model), as a JSON-ready dict.

    ``zero_shot_sets`` maps a name to (image set, prompt templates); ``retrieval_sets`` a name to
    (captioned image set, folds). Sets are in memory (``ImageSet``) or lazy (prepared splits,
    read through DataLoader workers as ``loader`` says).

    Keys: step, task, ut_acc, zs_acc (mean over the zero-shot sets), a_acc, bwt, learning_acc
    (R[step][step], the accuracy on the task just learnt; None at step 0), learning_acc_own
    (the same images among the task's own classes only; None at step 0), seen_acc (the classes
    learnt so far, classified among themselves; every class at step 0), i2t_r1..t2i_r10
    (the first retrieval set; None without one), ut_top1 (plain top-1 over all updated-task test
    images, the paper's OST UT-Acc), acc_row (accuracy on each phase 1..T), and each set alone
    as ``zs_acc/<name>`` and ``retrieval/<name>/<metric>``. ``previous_rows[i]`` is the acc_row
    of step i, required for i = 0..step-1 from step 2 on. The model is left as it was found.
    """
    step = int(step)
    phases, earlier = _checked_step(step, updated_test, class_prompts, phases, previous_rows)
    with evaluating(clip, device) as target:
        # Per route where the model routes its images (MoE-Adapters' DDAS); named for a model
        # with its own classifier (RAIL).
        class_feats = class_features(clip, lambda: text_features(clip, class_prompts, batch_size, target),
                                     updated_test.class_names)
        # The session just learnt among its own classes too: what its loss trained (the paper's
        # MST masks the cross-entropy to them, CL-CLIP methods/ft.py text_fmask).
        own = [phases[step - 1]] if step > 0 else []
        with evaluating_task(clip.model, EvaluatedTask(mixed_batches=True)):  # one test set, every phase
            ut_predictions, ut_seen_predictions, *own_predictions = predictions_among(
                clip, updated_test, class_feats, [None, seen_classes(phases, step), *own], batch_size, loader)
        acc_row = phase_accuracies(ut_predictions, updated_test.labels, phases)
        suite = _suite_metrics(clip, zero_shot_sets, retrieval_sets or {}, batch_size, target, loader)
    learning_own = seen_accuracy(own_predictions[0], updated_test.labels, own[0]) if own else None
    return _step_record(step, task, updated_test.labels, phases, earlier, acc_row, ut_predictions,
                        ut_seen_predictions, suite, learning_own)


def _checked_step(step: int, updated_test: Any, class_prompts: Sequence[str], phases: Sequence[Sequence[int]],
                  previous_rows: Sequence[Sequence[float]] | None) -> tuple[list[list[int]], list[list[float]]]:
    """The checked phases and the earlier accuracy rows, before any model work."""
    if len(class_prompts) != len(updated_test.class_names):
        raise ValueError(
            f"need one prompt per class of the updated task ({len(updated_test.class_names)}), "
            f"got {len(class_prompts)}"
        )
    phases = check_phases(phases, len(class_prompts))
    num_tasks = len(phases)
    if not 0 <= step <= num_tasks:
        raise ValueError(f"step {step} is outside 0..{num_tasks} (the number of phases)")
    return phases, _earlier_rows(previous_rows, step, num_tasks)


def _step_record(step: int, task: str, labels: np.ndarray, phases: list[list[int]], earlier: list[list[float]],
                 acc_row: list[float], ut_predictions: np.ndarray, ut_seen_predictions: np.ndarray,
                 suite: dict[str, Any], learning_own: float | None) -> dict[str, Any]:
    """The step's JSON-ready record (keys in the order ``evaluate_step`` documents)."""
    # Before step 2 neither UT-Acc nor BWT reads an earlier row: stand-ins keep the shapes.
    rows = np.asarray(earlier + [acc_row]) if step >= 2 else np.asarray([acc_row] * (step + 1))
    ut = ut_acc(rows, step)
    return {
        "step": step,
        "task": str(task),
        "ut_acc": ut,
        "zs_acc": suite["zs_acc"],
        "a_acc": (ut + suite["zs_acc"]) / 2.0,
        "bwt": bwt_at(rows, step),
        "learning_acc": float(acc_row[step - 1]) if step > 0 else None,
        "learning_acc_own": learning_own,
        "seen_acc": seen_accuracy(ut_seen_predictions, labels, seen_classes(phases, step)),
        **{key: suite[key] for key in RETRIEVAL_KEYS},
        "ut_top1": top1_accuracy(ut_predictions, labels),
        "acc_row": [float(v) for v in acc_row],
        **{key: value for key, value in suite.items() if "/" in key},
    }
