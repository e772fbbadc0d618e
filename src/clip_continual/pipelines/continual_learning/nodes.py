"""Thin nodes of the continual sequence: fine-tune on one task, evaluate after it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from clip_continual.data.common import ImageSet
from clip_continual.evaluation import evaluate_step
from clip_continual.methods import METHODS, method_takes_alpha
from clip_continual.models import ClipModel
from clip_continual.replay import ReplayVocabulary
from clip_continual.tracking import CONTINUAL_GROUP, TASK_COSTS, TASK_GROUP, log_metrics, metric_history
from clip_continual.training import TrainingConfig, TrainingConfigError, fine_tune, plan_training

logger = logging.getLogger(__name__)

TEACHERS = ("auto", "previous", "pretrained")


def class_prompts(image_set: ImageSet, template: str) -> list[str]:
    return [template.format(name) for name in image_set.class_names]


def training_config(method: str, params: dict[str, Any], seed: int, default_teacher: str) -> TrainingConfig:
    """The task's training settings from ``params:continual_learning``; raises
    ``TrainingConfigError`` (a ValueError) naming the bad setting and its allowed values."""
    teacher_choice = params.get("teacher", "auto")
    alpha = params.get("alpha")
    if method in METHODS and not method_takes_alpha(method):
        alpha = None  # one alpha for the sweep; ft has no distillation weight to set
    if teacher_choice not in TEACHERS:
        raise TrainingConfigError(f"unknown teacher '{teacher_choice}': choose one of {', '.join(TEACHERS)}")
    options = (params.get("methods") or {}).get(method) or {}
    return TrainingConfig.from_params({
        **(params.get("training") or {}), "method": method, "alpha": alpha, "seed": seed,
        "teacher": default_teacher if teacher_choice == "auto" else teacher_choice,
        "method_options": options,
    })


def _steps_before(config: TrainingConfig, train_set: ImageSet, phases: tuple[tuple[int, ...], ...],
                  task_index: int) -> int:
    """Iterations of the tasks before ``task_index``, so that the training-loss curve goes on
    across tasks (also when a task's length is given in epochs, ``steps: null``)."""
    return sum(
        plan_training(config, int(np.isin(train_set.labels, phase).sum())).total_steps
        for phase in phases[: task_index - 1]
    )


def fine_tune_task(
    start_model: ClipModel,
    train_set: ImageSet,
    vocabulary: ReplayVocabulary,
    method: str,
    params: dict[str, Any],
    prompts: dict[str, Any],
    tracking: dict[str, Any],
    seed: int,
    reference_set: ImageSet,
    pretrained_model: ClipModel | None = None,
    previous_method_state: dict[str, np.ndarray] | None = None,
    *,
    task_index: int,
    phases: tuple[tuple[int, ...], ...],
    updated_task: str,
    default_teacher: str,
) -> tuple[ClipModel, dict[str, Any], dict[str, np.ndarray]]:
    """Train task ``task_index``; also returns what the method hands to the next task."""
    config = training_config(method, params, seed, default_teacher)
    continual_method = config.build_method()
    teacher = start_model if config.teacher == "previous" or pretrained_model is None else pretrained_model
    seen = sorted({c for phase in phases[:task_index] for c in phase})
    log_every = max(1, int(tracking.get("log_every", 1)))
    offset = _steps_before(config, train_set, phases, task_index)

    def log_losses(step: int, losses: dict[str, float]) -> None:
        if step % log_every == 0:
            log_metrics({f"train/{name}": value for name, value in losses.items()}, step=offset + step)

    model, summary = fine_tune(
        start_model,
        train_set.restrict_to_classes(phases[task_index - 1]),
        class_prompts(train_set, prompts[updated_task]),
        current_classes=list(phases[task_index - 1]),
        seen_classes=seen,
        config=config,
        vocabulary=vocabulary,
        teacher=teacher,
        task_index=task_index,
        on_step=log_losses,
        method=continual_method,
        # Task 1 starts from the pretrained model, which the pipeline hands in only as start_model.
        extras={"reference_set": reference_set,
                "pretrained_model": start_model if pretrained_model is None else pretrained_model},
        previous_state=previous_method_state,
    )
    model.metadata.update({"method": method, "task_index": task_index, "classes": list(phases[task_index - 1])})
    return model, summary, continual_method.export_state()


def evaluate_model(
    model: ClipModel,
    updated_test: ImageSet,
    zero_shot_set: ImageSet,
    retrieval_set: ImageSet,
    prompts: dict[str, Any],
    params: dict[str, Any],
    previous_evaluation: dict[str, Any] | None = None,
    *,
    step: int,
    task: str,
    phases: tuple[tuple[int, ...], ...],
    updated_task: str,
) -> dict[str, Any]:
    """Metrics after ``step`` (0 = the starting model), carrying the accuracy rows so far."""
    earlier = list(previous_evaluation["acc_rows"]) if previous_evaluation else []
    result = evaluate_step(
        model,
        step=step,
        task=task,
        updated_test=updated_test,
        class_prompts=class_prompts(updated_test, prompts[updated_task]),
        phases=[list(p) for p in phases],
        zero_shot_set=zero_shot_set,
        zero_shot_templates=list(prompts["shapes"]),
        retrieval_set=retrieval_set,
        batch_size=params["batch_size"],
        device=params.get("device", "auto"),
        previous_rows=earlier or None,
        retrieval_folds=params.get("retrieval_folds", 1),
    )
    result["acc_rows"] = earlier + [result["acc_row"]]
    logger.info("step %d (%s): UT-Acc %.3f  ZS-Acc %.3f  BWT %+.3f", step, task, result["ut_acc"],
                result["zs_acc"], result["bwt"])
    return result


def step_metrics_for_mlflow(evaluation: dict[str, Any],
                            training_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """A step's metrics as MLflow metrics ``continual/<name>`` at ``step`` = task index, and what
    the task cost (``task/<cost>``, the same step). A node of its own: a resumed run
    (``--only-missing-outputs``) logs the finished tasks' stored evaluations again without
    evaluating their models again, so it holds the whole sequence."""
    step = evaluation["step"]
    costs = {k: training_summary[k] for k in TASK_COSTS if k in training_summary} if training_summary else {}
    return metric_history(evaluation, CONTINUAL_GROUP, step) | metric_history(costs, TASK_GROUP, step)
