"""One namespaced chain per task: ``<benchmark>.task_k`` fine-tunes the model handed on by
``<benchmark>.task_{k-1}`` (the pretrained model for task_1) and evaluates the result. The
pretrained model is evaluated once as step 0 (``<benchmark>.pretrained``)."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from clip_continual.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, Benchmark
from clip_continual.pipelines import bind
from clip_continual.pipelines.continual_learning import nodes


def _namespaced(template: Pipeline, namespace: str, shared: dict[str, str]) -> Pipeline:
    """Prefix the chain's own datasets with ``namespace``; shared inputs and parameters keep
    their global names."""
    free = template.inputs()
    return Pipeline(
        template,
        namespace=namespace,
        inputs={name: global_name for name, global_name in shared.items() if name in free},
        parameters={name for name in free if name.startswith("params:")},
    )


def _evaluate_node(benchmark: Benchmark, step: int, task: str, with_previous: bool) -> Node:
    inputs = {
        "model": "model",
        "updated_test": "updated_test",
        "zero_shot_set": "shapes_zero_shot",
        "retrieval_set": "shapes_retrieval",
        "prompts": "params:prompts",
        "params": "params:evaluation",
    }
    if with_previous:
        inputs["previous_evaluation"] = "previous_evaluation"
    return Node(
        bind(nodes.evaluate_model, step=step, task=task, phases=benchmark.phases,
             updated_task=benchmark.updated_task),
        inputs=inputs,
        outputs="evaluation",
        # Named per task: kedro viz shows a node's own name inside its namespace.
        name=f"evaluate_after_{task}" if step else "evaluate_starting_model",
        tags=["evaluation"],
    )


def _evaluation_steps(benchmark: Benchmark, step: int, task: str, with_previous: bool) -> Pipeline:
    """Evaluate the model after ``step``, then hand its metrics (and the task's costs) to MLflow."""
    track = Node(
        nodes.step_metrics_for_mlflow,
        inputs=["evaluation", "training_summary"] if step else "evaluation",
        outputs="mlflow_metrics",
        name=f"track_after_{task}" if step else "track_starting_model",
        tags=["tracking"],
    )
    return Pipeline([_evaluate_node(benchmark, step, task, with_previous), track])


def _task_pipeline(benchmark: Benchmark, index: int, task: str, previous: str | None) -> Pipeline:
    fine_tune_inputs = {
        "start_model": "start_model",
        "train_set": "updated_train",
        "vocabulary": "replay_vocabulary",
        "method": "params:method",
        "params": "params:continual_learning",
        "prompts": "params:prompts",
        "tracking": "params:tracking",
        "seed": "params:seed",
        "reference_set": "reference_set",
    }
    if previous is not None:  # `teacher: pretrained` needs it after task_1
        fine_tune_inputs["pretrained_model"] = "pretrained_model"
        fine_tune_inputs["previous_method_state"] = "previous_method_state"
    fine_tune = Node(
        bind(nodes.fine_tune_task, task_index=index, phases=benchmark.phases,
             updated_task=benchmark.updated_task, default_teacher=benchmark.default_teacher),
        inputs=fine_tune_inputs,
        outputs=["model", "training_summary", "method_state"],
        name=f"fine_tune_{task}",
        tags=["training"],
    )
    start = f"{benchmark.name}.{previous}.model" if previous else "pretrained_model"
    shared = {
        "start_model": start,
        "previous_evaluation": f"{benchmark.name}.{previous or 'pretrained'}.evaluation",
        "updated_train": f"{benchmark.updated_task}_train",
        "updated_test": f"{benchmark.updated_task}_test",
        "shapes_zero_shot": "shapes_zero_shot",
        "shapes_retrieval": "shapes_retrieval",
        "replay_vocabulary": "replay_vocabulary",
        "pretrained_model": "pretrained_model",
        "reference_set": "reference_set",
        "previous_method_state": f"{benchmark.name}.{previous}.method_state",
    }
    return _namespaced(
        Pipeline([fine_tune, _evaluation_steps(benchmark, index, task, with_previous=True)]),
        f"{benchmark.name}.{task}",
        shared,
    )


def create_pipeline(benchmark: Benchmark | None = None, **kwargs) -> Pipeline:
    benchmark = benchmark or BENCHMARKS[DEFAULT_BENCHMARK]
    start = _namespaced(
        _evaluation_steps(benchmark, 0, "pretrained", with_previous=False),
        f"{benchmark.name}.pretrained",
        {"model": "pretrained_model", "updated_test": f"{benchmark.updated_task}_test",
         "shapes_zero_shot": "shapes_zero_shot", "shapes_retrieval": "shapes_retrieval"},
    )
    chain = [start]
    previous = None
    for index, task in enumerate(benchmark.task_names, start=1):
        chain.append(_task_pipeline(benchmark, index, task, previous))
        previous = task
    return Pipeline(chain, tags=["continual_learning", benchmark.name])
