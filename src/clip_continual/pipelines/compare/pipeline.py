from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines.compare import nodes


def create_pipeline(**kwargs) -> Pipeline:
    # Reading MLflow opens no run of its own: conf/base/mlflow.yml lists it as untracked.
    return Pipeline(
        [
            Node(
                nodes.compare_methods,
                inputs="params:compare",
                outputs=["method_comparison", "method_comparison_runs", "method_comparison_plot",
                         "method_comparison_costs_plot"],
                name="compare_methods",
            )
        ],
        tags="compare",
    )
