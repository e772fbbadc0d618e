from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines.compare import nodes


def create_pipeline(**kwargs) -> Pipeline:
    # Tagged untracked: reading MLflow must not open a run of its own.
    return Pipeline(
        [
            Node(
                nodes.compare_methods,
                inputs=["params:tracking", "params:compare"],
                outputs=["method_comparison", "method_comparison_runs", "method_comparison_plot"],
                name="compare_methods",
            )
        ],
        tags=["compare", "untracked"],
    )
