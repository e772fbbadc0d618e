"""``evaluate_checkpoints`` (the embedded default's suite) and ``evaluate_checkpoints_<benchmark>``:
the benchmark's starting model and the given checkpoints evaluated as the steps of a training
run, and that run's reports. The benchmark is part of the pipeline's name because Kedro fixes
the datasets a pipeline reads when it registers it."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from clip_continual.runtime.checkpoint_sequence import SETTINGS
from clip_continual.pipelines import bind
from clip_continual.pipelines.continual_learning.pipeline import suite_evaluation
from clip_continual.pipelines.evaluate_checkpoints import nodes
from clip_continual.pipelines.evaluation.nodes import summary_metrics_for_mlflow
from clip_continual.runtime.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, Benchmark

PIPELINE = "evaluate_checkpoints"
REPORTS = ["continual_metrics", "accuracy_matrix", "continual_summary", "accuracy_matrix_plot", "metric_curves_plot"]


def pipeline_name(benchmark: Benchmark) -> str:
    return f"{PIPELINE}_{benchmark.name}"


def create_pipeline(benchmark: Benchmark | None = None, **kwargs) -> Pipeline:
    benchmark = benchmark or BENCHMARKS[DEFAULT_BENCHMARK]
    _, suite = suite_evaluation(benchmark)
    settings = f"params:{SETTINGS}"
    updated_test = {"updated_test": benchmark.suite.updated_test} if benchmark.suite.updated_test else {}
    return Pipeline(
        [
            Node(bind(nodes.evaluate_checkpoint_sequence, benchmark=benchmark),
                 inputs={"start_model": benchmark.pretrained_model, "settings": settings, **suite},
                 outputs="checkpoint_evaluations", name=f"evaluate_{benchmark.name}_checkpoints",
                 tags=["evaluation"]),
            Node(bind(nodes.report_checkpoint_evaluations, benchmark=benchmark),
                 inputs={"settings": settings, "evaluations": "checkpoint_evaluations", **updated_test},
                 outputs=REPORTS, name="report_checkpoint_evaluations"),
            Node(nodes.checkpoint_metrics_for_mlflow, inputs="checkpoint_evaluations",
                 outputs="checkpoint_mlflow_metrics", name="track_checkpoint_evaluations", tags=["tracking"]),
            Node(summary_metrics_for_mlflow, inputs="continual_summary",
                 outputs="continual_summary_mlflow_metrics", name="track_continual_summary", tags=["tracking"]),
        ],
        tags=[PIPELINE, benchmark.name],
    )
