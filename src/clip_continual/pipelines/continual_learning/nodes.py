"""Thin nodes of the continual sequence: fine-tune on one task, evaluate after it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from clip_continual.benchmarks import Benchmark
from clip_continual.data.common import ImageSet
from clip_continual.data.index import ImageIndex
from clip_continual.data.loading import LoaderConfig, training_source
from clip_continual.distributed import DistributedConfig, fine_tune_distributed
from clip_continual.evaluation import evaluate_step, fill_template
from clip_continual.methods import METHODS, method_takes_alpha
from clip_continual.models import ClipModel
from clip_continual.replay import ReplayVocabulary
from clip_continual.tracking import log_metrics
from clip_continual.training import TrainingConfig, TrainingConfigError, plan_training

logger = logging.getLogger(__name__)

TEACHERS = ("auto", "previous", "pretrained")


def class_prompts(image_set: ImageSet | ImageIndex, template: str) -> list[str]:
    return [fill_template(template, name) for name in image_set.class_names]


def training_config(method: str, params: dict[str, Any], seed: int, default_teacher: str) -> TrainingConfig:
    """The task's training settings from ``params:continual_learning``; raises
    ``TrainingConfigError`` (a ValueError) naming the bad setting and its allowed values."""
    teacher_choice = params.get("teacher", "auto")
    alpha = params.get("alpha")
    if method in METHODS and not method_takes_alpha(method):
        alpha = None  # one alpha for the sweep; ft has no distillation weight to set
    if teacher_choice not in TEACHERS:
        raise TrainingConfigError(f"unknown teacher '{teacher_choice}': choose one of {', '.join(TEACHERS)}")
    training = {k: v for k, v in (params.get("training") or {}).items() if k != "distributed"}
    options = (params.get("methods") or {}).get(method) or {}
    return TrainingConfig.from_params({
        **training, "method": method, "alpha": alpha, "seed": seed,
        "teacher": default_teacher if teacher_choice == "auto" else teacher_choice,
        "method_options": options,
    })


def _steps_before(config: TrainingConfig, train_labels: np.ndarray, benchmark: Benchmark,
                  task_index: int) -> int:
    """Iterations of the tasks before ``task_index``, so that the training-loss curve goes on
    across tasks (also when a task's length is given in epochs, ``steps: null``)."""
    return sum(
        plan_training(config, int(np.isin(train_labels, task.classes).sum())).total_steps
        for task in benchmark.tasks[: task_index - 1]
    )


def fine_tune_task(
    start_model: ClipModel,
    train_set: ImageSet | ImageIndex,
    vocabulary: ReplayVocabulary,
    method: str,
    params: dict[str, Any],
    prompts: dict[str, Any],
    tracking: dict[str, Any],
    seed: int,
    loader: dict[str, Any] | None = None,
    reference_set: ImageSet | None = None,
    pretrained_model: ClipModel | None = None,
    previous_method_state: dict[str, np.ndarray] | None = None,
    *,
    task_index: int,
    benchmark: Benchmark,
) -> tuple[ClipModel, dict[str, Any], dict[str, np.ndarray]]:
    """Train task ``task_index``; also returns what the method hands to the next task.
    Parameters come before the optional datasets: Kedro's parameter check maps inputs by position."""
    config = training_config(method, params, seed, benchmark.default_teacher)
    distributed = DistributedConfig.from_params((params.get("training") or {}).get("distributed"))
    continual_method = config.build_method()
    teacher = start_model if config.teacher == "previous" or pretrained_model is None else pretrained_model
    task = benchmark.tasks[task_index - 1]
    seen = sorted({c for phase in benchmark.phases[:task_index] for c in phase})
    log_every = max(1, int(tracking.get("log_every", 1)))
    offset = _steps_before(config, train_set.labels, benchmark, task_index)

    def log_losses(step: int, losses: dict[str, float]) -> None:
        if step % log_every == 0:
            log_metrics({f"train/{name}": value for name, value in losses.items()}, step=offset + step)

    model, summary = fine_tune_distributed(
        distributed,
        start_model,
        training_source(train_set.restrict_to_classes(task.classes), LoaderConfig.from_params(loader)),
        class_prompts(train_set, prompts[benchmark.suite.updated_prompt_key]),
        current_classes=list(task.classes),
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
    model.metadata.update({"method": method, "task_index": task_index, "classes": list(task.classes)})
    return model, summary, continual_method.export_state()


def _templates(prompts: dict[str, Any], key: str) -> list[str]:
    value = prompts[key]
    return [value] if isinstance(value, str) else list(value)


def evaluate_model(
    model: ClipModel,
    updated_test: ImageSet | ImageIndex,
    prompts: dict[str, Any],
    params: dict[str, Any],
    loader: dict[str, Any] | None = None,
    previous_evaluation: dict[str, Any] | None = None,
    *,
    step: int,
    task: str,
    benchmark: Benchmark,
    **eval_sets: ImageSet | ImageIndex,
) -> dict[str, Any]:
    """Metrics after ``step`` (0 = the starting model) on the benchmark's evaluation suite,
    carrying the accuracy rows so far. ``eval_sets`` are ``zero_shot_<i>`` and ``retrieval_<i>``
    in the order of the suite."""
    suite = benchmark.suite
    earlier = list(previous_evaluation["acc_rows"]) if previous_evaluation else []
    default_folds = params.get("retrieval_folds", 1)
    result = evaluate_step(
        model,
        step=step,
        task=task,
        updated_test=updated_test,
        class_prompts=class_prompts(updated_test, prompts[suite.updated_prompt_key]),
        phases=[list(p) for p in benchmark.phases],
        zero_shot_sets={s.dataset: (eval_sets[f"zero_shot_{i}"], _templates(prompts, s.prompt_key))
                        for i, s in enumerate(suite.zero_shot)},
        retrieval_sets={s.dataset: (eval_sets[f"retrieval_{i}"], s.folds or default_folds)
                        for i, s in enumerate(suite.retrieval)},
        batch_size=params["batch_size"],
        device=params.get("device", "auto"),
        previous_rows=earlier or None,
        loader=LoaderConfig.from_params(loader),
    )
    result["acc_rows"] = earlier + [result["acc_row"]]
    logger.info("step %d (%s): UT-Acc %.3f  ZS-Acc %.3f  BWT %+.3f", step, task, result["ut_acc"],
                result["zs_acc"], result["bwt"])
    return result
