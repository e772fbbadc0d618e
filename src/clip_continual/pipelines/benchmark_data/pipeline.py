"""A named benchmark's data and starting model: check every input, read the raw splits, write
each prepared split once (``prepared_<split>``, WebDataset shards), load the pretrained CLIP and
decode the reference set at its resolution (``<benchmark>.reference_set``, for agem/gem/zscl)."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from clip_continual.runtime.recipe import RUNTIME_OVERRIDES
from clip_continual.pipelines import bind
from clip_continual.pipelines.benchmark_data import nodes
from clip_continual.runtime.benchmarks import Benchmark

PREFIX = "prepared_"


def raw_splits(benchmark: Benchmark) -> tuple[str, ...]:
    """The raw splits behind the ``prepared_<split>`` datasets a benchmark reads."""
    names = [task.train_set for task in benchmark.tasks] + list(benchmark.test_sets)
    return tuple(dict.fromkeys(name.removeprefix(PREFIX) for name in names if name.startswith(PREFIX)))


def create_pipeline(benchmark: Benchmark, **kwargs) -> Pipeline:
    splits = raw_splits(benchmark)
    block = benchmark.params_block
    check = Node(
        bind(nodes.check_inputs, splits=splits, benchmark=benchmark),
        inputs=[block("data"), block("continual_learning"), block("loader"), block("model"),
                block("preparation"), block("reference"), "params:method", block("seed"),
                block("evaluation"), f"params:{RUNTIME_OVERRIDES}"],
        outputs=[*(f"{benchmark.name}.raw_{split}" for split in splits), f"{benchmark.name}.raw_reference"],
        name=f"check_{benchmark.name}_inputs",
    )
    prepare = [
        Node(nodes.prepare_split, inputs=[f"{benchmark.name}.raw_{split}", block("preparation")],
             outputs=f"{PREFIX}{split}", name=f"prepare_{split}")
        for split in splits
    ]
    model = Node(nodes.load_pretrained_model, inputs=[block("model"), block("seed")],
                 outputs=benchmark.pretrained_model, name=f"load_{benchmark.name}_model")
    reference = Node(nodes.prepare_reference_set,
                     inputs=[f"{benchmark.name}.raw_reference", benchmark.pretrained_model, block("loader")],
                     outputs=benchmark.reference_set, name=f"prepare_{benchmark.name}_reference_set")
    return Pipeline([check, *prepare, model, reference], tags=["data_preparation", benchmark.name])
