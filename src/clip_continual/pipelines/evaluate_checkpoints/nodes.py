"""Thin nodes: evaluate given checkpoints one after another as the steps of a continual run,
then write that run's reports."""

from __future__ import annotations

import logging
from typing import Any

from clip_continual.runtime.checkpoint_sequence import CheckpointSequence
from clip_continual.model.checkpoint_formats import load_any_checkpoint
from clip_continual.model.clip import ClipModel
from clip_continual.pipelines.continual_learning.nodes import step_metrics_for_mlflow
from clip_continual.pipelines.continual_learning.pipeline import suite_evaluation
from clip_continual.pipelines.evaluation.pipeline import report_function
from clip_continual.runtime.benchmarks import Benchmark

logger = logging.getLogger(__name__)


def evaluate_checkpoint_sequence(start_model: ClipModel, settings: dict[str, Any], *, benchmark: Benchmark,
                                 **suite: Any) -> list[dict[str, Any]]:
    """Step 0 is the benchmark's starting model, step k the k-th checkpoint, each evaluated as
    a training run evaluates the model after task k (``suite``: that node's inputs)."""
    sequence = CheckpointSequence.from_params(settings, benchmark)
    evaluate, _ = suite_evaluation(benchmark)
    evaluations = [evaluate(model=start_model, step=0, task="pretrained", benchmark=benchmark, **suite)]
    for step, (task, path) in enumerate(zip(benchmark.task_names, sequence.checkpoints), start=1):
        model = load_any_checkpoint(path, start_model, step, sequence.options)
        logger.info("step %d (%s): %s, read as %s", step, task, path,
                    model.metadata.get("checkpoint_format", "clip-continual"))
        evaluations.append(evaluate(model=model, previous_evaluation=evaluations[-1], step=step, task=task,
                                    benchmark=benchmark, **suite))
    return evaluations


def report_checkpoint_evaluations(settings: dict[str, Any], evaluations: list[dict[str, Any]],
                                  updated_test: Any = None, *, benchmark: Benchmark) -> tuple:
    """The training run's reports (metrics table, accuracy matrix, summary, both plots), named
    by ``label``."""
    label = CheckpointSequence.from_params(settings, benchmark).label
    tested = [updated_test] if benchmark.suite.updated_test else []
    return report_function(benchmark)(label, {}, None, *tested, *evaluations)[:5]


def checkpoint_metrics_for_mlflow(evaluations: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Every step's metrics as MLflow metric histories (``step`` = task index), as a training
    run logs them step by step."""
    history: dict[str, list[dict[str, float]]] = {}
    for evaluation in evaluations:
        for name, point in step_metrics_for_mlflow(evaluation).items():
            history.setdefault(name, []).append(point)
    return history
