"""Project pipelines."""

from kedro.pipeline import Pipeline

from clip_continual.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK
from clip_continual.pipelines import (
    compare, continual_learning, data_preparation, evaluation, pretraining, vocabulary_replay,
)


def register_pipelines() -> dict[str, Pipeline]:
    """``__default__`` runs the embedded default end to end: data, pretraining, vocabulary,
    the continual sequence of the default benchmark with its evaluation and reports.
    Every benchmark is also a pipeline of its own: the run's replayed vocabulary (it depends on
    the method, so another `--params method=...` needs its own), the continual sequence and its
    evaluation, from the prepared data and the pretrained model on disk.

    The pipelines are listed here rather than discovered with ``find_pipelines``: with
    ``kedro run --pipelines <name>`` Kedro asks it for that one package only, which fails for
    the benchmarks (built here, not packages) and leaves out the parts ``__default__`` needs.
    """
    pipelines = {
        "data_preparation": data_preparation.create_pipeline(),
        "pretraining": pretraining.create_pipeline(),
        "vocabulary_replay": vocabulary_replay.create_pipeline(),
        "continual_learning": continual_learning.create_pipeline(BENCHMARKS[DEFAULT_BENCHMARK]),
        "evaluation": evaluation.create_pipeline(BENCHMARKS[DEFAULT_BENCHMARK]),
        "compare": compare.create_pipeline(),
    }
    for name, benchmark in BENCHMARKS.items():
        pipelines[name] = (
            pipelines["vocabulary_replay"]
            + continual_learning.create_pipeline(benchmark)
            + evaluation.create_pipeline(benchmark)
        )
    pipelines["__default__"] = (
        pipelines["data_preparation"]
        + pipelines["pretraining"]
        + pipelines["vocabulary_replay"]
        + pipelines[DEFAULT_BENCHMARK]
    )
    return pipelines
