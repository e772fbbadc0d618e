"""Thin nodes of the continual sequence: fine-tune on one task, evaluate after it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from clip_continual.data import zscl_text
from clip_continual.data.common import ImageSet
from clip_continual.data.index import ImageIndex
from clip_continual.data.loading import LoaderConfig
from clip_continual.data.mtil import few_shot_positions
from clip_continual.evaluation.protocols import EvaluationProtocol
from clip_continual.evaluation.sequences import evaluate_class_incremental_step, evaluate_datasets_step
from clip_continual.evaluation.step import evaluate_step
from clip_continual.evaluation.zero_shot import fill_template
from clip_continual.methods import method_class
from clip_continual.methods.vocabulary import ReplayVocabulary
from clip_continual.model.clip import ClipModel
from clip_continual.runtime.benchmarks import Benchmark
from clip_continual.runtime.recipe import TaskRecipe, block_path_of, overridden, resolve_task, seed_path_of
from clip_continual.runtime.tracking import (
    COST_GROUP, TRAINED_IN, BatchedMetrics, active_run_id, metric_history, paid_costs, step_metric_history,
)
from clip_continual.training.config import TrainingConfig
from clip_continual.training.distributed import DistributedConfig, train_on
from clip_continual.training.loop import StepCallback
from clip_continual.training.schedule import plan_training
from clip_continual.training.task import training_task

logger = logging.getLogger(__name__)


def class_prompts(image_set: ImageSet | ImageIndex, template: str) -> list[str]:
    return [fill_template(template, name) for name in image_set.class_names]


def task_recipe(method: str, params: dict[str, Any], seed: int, benchmark: Benchmark, task: str,
                overrides: dict[str, Any] | None = None) -> TaskRecipe:
    """The settings ``task`` trains with (``clip_continual.runtime.recipe``: one precedence from
    the method's defaults to ``--params``); ``params`` is the benchmark's ``continual_learning``."""
    seed_path = seed_path_of(benchmark)
    return resolve_task(method, params, block_path_of(benchmark), task, seed=seed,
                        seed_source=f"--params {seed_path}" if overridden(overrides, seed_path) else seed_path,
                        default_teacher=benchmark.default_teacher, overrides=overrides)


def _steps_before(config: TrainingConfig, train_labels: np.ndarray, benchmark: Benchmark,
                  task_index: int) -> int:
    """Iterations of the tasks before ``task_index``, so that the training-loss curve goes on
    across tasks (also when a task's length is given in epochs, ``steps: null``). A task on a
    whole dataset of its own (MTIL) is counted at this task's size: exact when steps are fixed."""
    return sum(
        plan_training(config, int(np.isin(train_labels, task.classes).sum()) if task.classes
                      else len(train_labels)).total_steps
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
    overrides: dict[str, Any] | None = None,
    reference_set: ImageSet | None = None,
    pretrained_model: ClipModel | None = None,
    previous_method_state: dict[str, np.ndarray] | None = None,
    *,
    task_index: int,
    benchmark: Benchmark,
) -> tuple[ClipModel, dict[str, Any], dict[str, np.ndarray]]:
    """Train task ``task_index``; also returns what the method hands to the next task.
    Parameters come before the optional datasets: Kedro's parameter check maps inputs by position."""
    task = benchmark.tasks[task_index - 1]
    recipe = task_recipe(method, params, seed, benchmark, task.name, overrides)
    config = recipe.training_config()
    distributed = DistributedConfig.from_params(recipe.distributed())
    classes = task.classes or tuple(range(len(train_set.class_names)))  # empty: the whole dataset
    # Task 1 starts from the pretrained model, which the pipeline hands in only as start_model.
    pretrained = start_model if pretrained_model is None else pretrained_model
    templates = templates_for(prompts, task.prompt_key or benchmark.suite.updated_prompt_key)
    training = training_task(
        start_model,
        few_shot_train_set(train_set.restrict_to_classes(classes), recipe.settings),
        class_prompts(train_set, templates[0]),
        current_classes=list(classes),
        seen_classes=sorted({c for phase in benchmark.phases[:task_index - 1] for c in phase} | set(classes)),
        config=config,
        vocabulary=vocabulary,
        teacher=start_model if config.teacher == "previous" else pretrained,
        task_index=task_index,
        method=config.build_method(),
        loader=LoaderConfig.from_params(loader),
        extras={"reference_set": reference_set, "pretrained_model": pretrained,
                # every template's prompts, one list per template (ConDU's prototypes)
                "prompt_sets": [class_prompts(train_set, template) for template in templates]},
        previous_state=previous_method_state,
    )
    offset = _steps_before(config, train_set.labels, benchmark, task_index)
    with BatchedMetrics() as metrics:
        model, summary = train_on(distributed, training, _loss_logger(metrics, tracking, offset))
    model.metadata.update({"method": method, "task_index": task_index, "classes": list(classes)})
    summary[TRAINED_IN] = active_run_id()  # who paid for the task (see step_metrics_for_mlflow)
    return model, summary, training.method.handed_on()


def _loss_logger(metrics: BatchedMetrics, tracking: dict[str, Any], offset: int) -> StepCallback:
    """Every ``tracking.log_every``-th step's losses as MLflow metrics ``train/<term>``, at the
    step counted across tasks (``offset`` steps before this one)."""
    log_every = max(1, int(tracking.get("log_every", 1)))

    def log_losses(step: int, losses: dict[str, float]) -> None:
        if step % log_every == 0:
            metrics.log({f"train/{name}": value for name, value in losses.items()}, step=offset + step)

    return log_losses


def templates_for(prompts: dict[str, Any], key: str) -> list[str]:
    """The templates of ``prompts[key]``; an MTIL dataset absent there has ZSCL's (the first is
    the one training uses, ZSCL mtil/src/datasets/collections.py ``template``)."""
    value = prompts.get(key) if prompts else None
    if value is None and key in zscl_text.TEMPLATES:
        return list(zscl_text.TEMPLATES[key])
    if value is None:
        raise KeyError(f"no prompt template '{key}' in the benchmark's prompts parameters")
    return [value] if isinstance(value, str) else list(value)


def few_shot_train_set(train_set: Any, params: dict[str, Any]) -> Any:
    """``few_shot`` images per class drawn with ``few_shot_seed`` (the few-shot MTIL variant)."""
    shots = params.get("few_shot")
    if shots is None:
        return train_set
    return train_set.subset(few_shot_positions(train_set.labels, int(shots), int(params.get("few_shot_seed", 0))))


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
    evaluation_protocol(params, model.metadata.get("method"), benchmark)  # no task id reaches the model here
    earlier = list(previous_evaluation["acc_rows"]) if previous_evaluation else []
    default_folds = params.get("retrieval_folds", 1)
    result = evaluate_step(
        model,
        step=step,
        task=task,
        updated_test=updated_test,
        class_prompts=class_prompts(updated_test, prompts[suite.updated_prompt_key]),
        phases=[list(p) for p in benchmark.phases],
        zero_shot_sets={s.dataset: (eval_sets[f"zero_shot_{i}"], templates_for(prompts, s.prompt_key))
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


def step_metrics_for_mlflow(evaluation: dict[str, Any],
                            training_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """A step's metrics as MLflow metrics ``continual/<name>`` and ``retrieval/<recall>`` (each
    once, see ``step_metric_names``) at ``step`` = task index, and what the task cost
    (``cost/<name>``, the same step). A node of its own: a resumed run
    (``--only-missing-outputs``) logs the finished tasks' stored evaluations again without
    evaluating their models again, so it holds the whole sequence; their costs it did not pay,
    and does not log."""
    step = evaluation["step"]
    return step_metric_history(evaluation, step) | metric_history(paid_costs(training_summary), COST_GROUP, step)


def evaluate_datasets_model(
    model: ClipModel, prompts: dict[str, Any], params: dict[str, Any],
    loader: dict[str, Any] | None = None, previous_evaluation: dict[str, Any] | None = None,
    *, step: int, task: str, benchmark: Benchmark, **test_sets: Any,
) -> dict[str, Any]:
    """MTIL after ``step``: every task's test set (``test_<i>``, in task order) among its own
    classes with all its templates; the accuracy rows so far and Transfer / Avg / Last."""
    sets = {t.name: (test_sets[f"test_{i}"], templates_for(prompts, t.prompt_key))
            for i, t in enumerate(benchmark.tasks)}
    protocol = evaluation_protocol(params, model.metadata.get("method"), benchmark)
    result = evaluate_datasets_step(
        model, step, task, sets, params["batch_size"], params.get("device", "auto"),
        previous_rows=previous_evaluation["acc_rows"] if previous_evaluation else None,
        loader=LoaderConfig.from_params(loader), protocol=protocol,
    )
    result.update({"task_identity": protocol.task_identity, "label_space": protocol.label_space})
    logger.info("step %d (%s): Transfer %s  Avg %s  Last %s", step, task, result["transfer"], result["avg"],
                result["last"])
    return result


def evaluation_protocol(params: dict[str, Any], method: str | None, benchmark: Benchmark) -> EvaluationProtocol:
    """The benchmark's evaluation protocol (``evaluation.task_identity``, ``label_space``), with
    ``method`` (None: the starting model) checked to run under it."""
    protocol = EvaluationProtocol.from_params(params)
    protocol.check_evaluation(benchmark.name, benchmark.evaluation)
    if method is not None:
        declared = method_class(method)
        protocol.check_method(method, declared.task_identity, benchmark.evaluation, declared.label_spaces)
    return protocol


def evaluate_class_incremental_model(
    model: ClipModel, updated_test: Any, prompts: dict[str, Any], params: dict[str, Any],
    loader: dict[str, Any] | None = None, previous_evaluation: dict[str, Any] | None = None,
    *, step: int, task: str, benchmark: Benchmark,
) -> dict[str, Any]:
    """Class-incremental learning after ``step``: the seen classes' test images among them."""
    evaluation_protocol(params, model.metadata.get("method"), benchmark)  # no task id reaches the model here
    result = evaluate_class_incremental_step(
        model, step, task, updated_test, templates_for(prompts, benchmark.suite.updated_prompt_key),
        benchmark.phases, params["batch_size"], params.get("device", "auto"),
        previous_rows=previous_evaluation["acc_rows"] if previous_evaluation else None,
        loader=LoaderConfig.from_params(loader),
    )
    logger.info("step %d (%s): accuracy on the %d seen classes %.3f", step, task,
                len({c for p in benchmark.phases[:max(step, 1)] for c in p}), result["cil_acc"])
    return result
