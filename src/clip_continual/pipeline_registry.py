"""Project pipelines."""

from kedro.pipeline import Pipeline

from clip_continual.pipelines import (
    benchmark_data, compare, continual_learning, data_preparation, evaluate_checkpoints, evaluation, pretraining,
    vocabulary_replay,
)
from clip_continual.runtime.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, Benchmark
from clip_continual.runtime.recipe import RUNTIME_OVERRIDES
from clip_continual.runtime.run_key import SOURCE_KEY_PARAMETERS


def _benchmark_pipeline(benchmark: Benchmark, vocabulary: Pipeline) -> Pipeline:
    """The run's replayed vocabulary (it depends on the method), the continual sequence and its
    reports; a benchmark with its own parameters also checks and prepares its data and loads
    its pretrained CLIP."""
    chain = continual_learning.create_pipeline(benchmark) + evaluation.create_pipeline(benchmark)
    if not benchmark.params:
        return vocabulary + chain
    own_vocabulary = Pipeline(
        vocabulary,
        inputs={"pretrained_model": benchmark.pretrained_model},
        outputs={"replay_vocabulary": f"{benchmark.params}.replay_vocabulary"},
        parameters={"params:vocabulary_replay": "params:vocabulary_replay", "params:method": "params:method",
                    "params:seed": benchmark.params_block("seed")},
    )
    return benchmark_data.create_pipeline(benchmark) + own_vocabulary + chain


def _checkpoints_pipeline(benchmark: Benchmark) -> Pipeline:
    """Given checkpoints on a benchmark's evaluation suite; a benchmark with its own parameters
    also checks and prepares its test sets and loads its starting model (not its training data)."""
    evaluate = evaluate_checkpoints.create_pipeline(benchmark)
    if not benchmark.params:
        return evaluate
    test_data = benchmark_data.create_pipeline(benchmark).to_outputs(benchmark.pretrained_model, *benchmark.test_sets)
    return test_data + evaluate


_BUILT: dict[tuple, dict[str, Pipeline]] = {}


def register_pipelines() -> dict[str, Pipeline]:
    """The project's pipelines, built once per set of benchmarks: Kedro asks again for every
    session, and building a pipeline per benchmark takes over a second. They depend on the
    code alone (the benchmarks in ``BENCHMARKS``), not on any setting."""
    registered = tuple((name, id(benchmark)) for name, benchmark in BENCHMARKS.items())
    if registered not in _BUILT:
        _BUILT.clear()
        _BUILT[registered] = _build_pipelines()
    return dict(_BUILT[registered])


def _build_pipelines() -> dict[str, Pipeline]:
    """``__default__`` runs the embedded default end to end: data, pretraining, vocabulary,
    the continual sequence of the default benchmark with its evaluation and reports.
    Every benchmark is also a pipeline of its own: the embedded ones start from the prepared
    data and the pretrained model on disk; the paper's (coco_ost, coco_mst, eurosat_mst) check
    and prepare their data and load their CLIP first.

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
        pipelines[name] = _benchmark_pipeline(benchmark, pipelines["vocabulary_replay"])
        pipelines[evaluate_checkpoints.pipeline_name(benchmark)] = _checkpoints_pipeline(benchmark)
    pipelines["evaluate_checkpoints"] = pipelines[evaluate_checkpoints.pipeline_name(BENCHMARKS[DEFAULT_BENCHMARK])]
    pipelines["__default__"] = (
        pipelines["data_preparation"]
        + pipelines["pretraining"]
        + pipelines["vocabulary_replay"]
        + pipelines[DEFAULT_BENCHMARK]
    )
    return pipelines


def parameters_read(pipeline_names: list[str]) -> list[str]:
    """Every parameter (dotted) a run of the named pipelines reads, whole pipelines so that
    ``--to-nodes`` or a resumed run is not refused what it skips: their nodes' inputs, the
    start model's source key (``SOURCE_KEY_PARAMETERS``, resolved in catalog.yml where a node
    takes the pretrained model) and the hooks' ``tracking`` and ``method``; the ``--params``
    record itself aside."""
    from kedro.framework.project import pipelines

    inputs = set().union(*(pipelines[name].inputs() for name in pipeline_names))
    read = [name.removeprefix("params:") for name in inputs
            if name.startswith("params:") and name != f"params:{RUNTIME_OVERRIDES}"]
    if inputs & {"pretrained_model", "pretrained_model_cache"}:
        read += SOURCE_KEY_PARAMETERS
    return read + ["tracking", "method"]  # MLflow on or off, the run's label
