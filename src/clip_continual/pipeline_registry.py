"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from clip_continual.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK
from clip_continual.pipelines import continual_learning, evaluation


def register_pipelines() -> dict[str, Pipeline]:
    """``__default__`` runs the embedded default end to end: data, pretraining, vocabulary,
    the continual sequence of the default benchmark with its evaluation and reports.
    Every benchmark is also a pipeline of its own (continual sequence + evaluation)."""
    pipelines = find_pipelines(raise_errors=True)
    for name, benchmark in BENCHMARKS.items():
        pipelines[name] = continual_learning.create_pipeline(benchmark) + evaluation.create_pipeline(benchmark)
    pipelines["continual_learning"] = continual_learning.create_pipeline(BENCHMARKS[DEFAULT_BENCHMARK])
    pipelines["evaluation"] = evaluation.create_pipeline(BENCHMARKS[DEFAULT_BENCHMARK])
    pipelines["__default__"] = (
        pipelines["data_preparation"]
        + pipelines["pretraining"]
        + pipelines["vocabulary_replay"]
        + pipelines[DEFAULT_BENCHMARK]
    )
    return pipelines
