from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines import bind
from clip_continual.pipelines.evaluation import nodes
from clip_continual.runtime.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, Benchmark


def report_function(benchmark: Benchmark):
    """Tasks that are phases of one updated task name their classes under the matrix; MTIL's
    tasks are whole datasets, named by their columns."""
    if benchmark.suite.updated_test:
        return bind(nodes.report_continual_run, benchmark=benchmark.name, phases=benchmark.phases)
    return bind(nodes.report_dataset_run, benchmark=benchmark.name)


def create_pipeline(benchmark: Benchmark | None = None, **kwargs) -> Pipeline:
    """Reports over every step's evaluation (step 0 = the pretrained model) of a benchmark."""
    benchmark = benchmark or BENCHMARKS[DEFAULT_BENCHMARK]
    steps = ("pretrained", *benchmark.task_names)
    report = Node(
        report_function(benchmark),
        inputs=["params:method", benchmark.params_block("continual_learning"), benchmark.params_block("seed"),
                *([benchmark.suite.updated_test] if benchmark.suite.updated_test else []),
                *(f"{step}_evaluation" for step in steps)],
        outputs=["continual_metrics", "accuracy_matrix", "continual_summary",
                 "accuracy_matrix_plot", "metric_curves_plot", f"{benchmark.name}.run_metrics_archive"],
        name="report_continual_run",
    )
    track = Node(
        nodes.summary_metrics_for_mlflow,
        inputs=["continual_summary", *(f"{task}_training_summary" for task in benchmark.task_names)],
        outputs="continual_summary_mlflow_metrics",
        name="track_continual_summary",
        tags=["tracking"],
    )
    return Pipeline(
        [report, track],
        inputs={**{f"{step}_evaluation": f"{benchmark.name}.{step}.evaluation" for step in steps},
                **{f"{task}_training_summary": f"{benchmark.name}.{task}.training_summary"
                   for task in benchmark.task_names}},
        tags=["evaluation", benchmark.name],
    )
