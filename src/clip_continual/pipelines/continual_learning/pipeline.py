"""One namespaced chain per task: ``<benchmark>.task_k`` fine-tunes the model handed on by
``<benchmark>.task_{k-1}`` (the benchmark's pretrained model for task_1) on the task's training
set and evaluates the result on the benchmark's evaluation suite. The pretrained model is
evaluated once as step 0 (``<benchmark>.pretrained``)."""

from __future__ import annotations

from typing import Any, Callable

from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines import bind
from clip_continual.pipelines.continual_learning import nodes
from clip_continual.runtime.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, Benchmark
from clip_continual.runtime.recipe import RUNTIME_OVERRIDES


def _namespaced(template: Pipeline, namespace: str, shared: set[str]) -> Pipeline:
    """Prefix the chain's own datasets with ``namespace``; shared inputs and parameters keep
    their global names."""
    free = template.inputs()
    return Pipeline(
        template,
        namespace=namespace,
        inputs={name for name in free if name in shared and not name.startswith("params:")},
        parameters={name for name in free if name.startswith("params:")},
    )


def suite_evaluation(benchmark: Benchmark) -> tuple[Callable[..., dict[str, Any]], dict[str, str]]:
    """The node function that evaluates a model after a step on the benchmark's evaluation
    suite (phases of one updated task, MTIL's datasets, or class-incremental learning), and its
    inputs other than ``model`` and ``previous_evaluation``."""
    inputs = {"updated_test": benchmark.suite.updated_test} if benchmark.suite.updated_test else {}
    inputs.update({"prompts": benchmark.params_block("prompts"), "params": benchmark.params_block("evaluation")})
    if benchmark.params or benchmark.evaluation != "phases":
        inputs["loader"] = benchmark.params_block("loader")
    if benchmark.evaluation == "datasets":
        inputs.update({f"test_{i}": t.test_set for i, t in enumerate(benchmark.tasks)})
        return nodes.evaluate_datasets_model, inputs
    if benchmark.evaluation == "class_incremental":
        return nodes.evaluate_class_incremental_model, inputs
    inputs.update({f"zero_shot_{i}": s.dataset for i, s in enumerate(benchmark.suite.zero_shot)})
    inputs.update({f"retrieval_{i}": s.dataset for i, s in enumerate(benchmark.suite.retrieval)})
    return nodes.evaluate_model, inputs


def _evaluate_node(benchmark: Benchmark, step: int, task: str, model: str,
                   previous: str | None) -> Node:
    function, suite = suite_evaluation(benchmark)
    inputs = {"model": model, **suite, **({"previous_evaluation": previous} if previous is not None else {})}
    return Node(bind(function, step=step, task=task, benchmark=benchmark), inputs=inputs,
                outputs="evaluation", name=_evaluate_name(step, task), tags=["evaluation"])


def _evaluate_name(step: int, task: str) -> str:
    """Named per task: kedro viz shows a node's own name inside its namespace."""
    return f"evaluate_after_{task}" if step else "evaluate_starting_model"


def _evaluation_steps(benchmark: Benchmark, step: int, task: str, model: str,
                      previous: str | None) -> Pipeline:
    """Evaluate the model after ``step``, then hand its metrics (and the task's costs) to MLflow."""
    track = Node(
        nodes.step_metrics_for_mlflow,
        inputs=["evaluation", "training_summary"] if step else "evaluation",
        outputs="mlflow_metrics",
        name=f"track_after_{task}" if step else "track_starting_model",
        tags=["tracking"],
    )
    return Pipeline([_evaluate_node(benchmark, step, task, model, previous), track])


def _task_pipeline(benchmark: Benchmark, index: int, start: str, previous: str) -> Pipeline:
    """Task ``index`` from the model ``start``; ``previous`` names the step before it."""
    previous_evaluation = f"{benchmark.name}.{previous}.evaluation"
    task = benchmark.tasks[index - 1]
    fine_tune_inputs = {
        "start_model": start,
        "train_set": task.train_set,
        "vocabulary": f"{benchmark.params}.replay_vocabulary" if benchmark.params else "replay_vocabulary",
        "method": "params:method",
        "params": benchmark.params_block("continual_learning"),
        "prompts": benchmark.params_block("prompts"),
        "tracking": "params:tracking",
        "seed": benchmark.params_block("seed"),
    }
    # Parameters first, in the order of the node's signature: Kedro's parameter check maps
    # inputs by position.
    if benchmark.params:
        fine_tune_inputs["loader"] = benchmark.params_block("loader")
    fine_tune_inputs["overrides"] = f"params:{RUNTIME_OVERRIDES}"  # --params win over every level
    if benchmark.reference_set:
        fine_tune_inputs["reference_set"] = benchmark.reference_set
    if index > 1:  # `teacher: pretrained` needs it after task_1; the method's state is handed on
        fine_tune_inputs["pretrained_model"] = benchmark.pretrained_model
        fine_tune_inputs["previous_method_state"] = f"{benchmark.name}.{previous}.method_state"
    fine_tune = Node(
        bind(nodes.fine_tune_task, task_index=index, benchmark=benchmark),
        inputs=fine_tune_inputs,
        outputs=["model", "training_summary", "method_state"],
        name=f"fine_tune_{task.name}",
        tags=["training"],
    )
    evaluate = _evaluation_steps(benchmark, index, task.name, "model", previous_evaluation)
    shared = set(fine_tune_inputs.values()) | {previous_evaluation, *benchmark.test_sets}
    return _namespaced(Pipeline([fine_tune, evaluate]), f"{benchmark.name}.{task.name}", shared)


def create_pipeline(benchmark: Benchmark | None = None, **kwargs) -> Pipeline:
    benchmark = benchmark or BENCHMARKS[DEFAULT_BENCHMARK]
    start = _namespaced(
        _evaluation_steps(benchmark, 0, "pretrained", benchmark.pretrained_model, None),
        f"{benchmark.name}.pretrained",
        {benchmark.pretrained_model, *benchmark.test_sets},
    )
    chain = [start]
    previous = "pretrained"
    for index, task in enumerate(benchmark.task_names, start=1):
        start_model = (f"{benchmark.name}.{previous}.model" if index > 1 else benchmark.pretrained_model)
        chain.append(_task_pipeline(benchmark, index, start_model, previous))
        previous = task
    return Pipeline(chain, tags=["continual_learning", benchmark.name])
