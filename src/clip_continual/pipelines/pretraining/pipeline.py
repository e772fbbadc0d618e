from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines.pretraining import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.pretrain_clip,
                inputs=["pretraining_corpus", "pretrained_model_cache", "params:model", "params:pretraining",
                        "params:data_preparation", "params:seed"],
                outputs="pretrained_model",
                name="pretrain_clip",
            ),
            Node(
                nodes.evaluate_pretrained,
                inputs=["pretrained_model", "shapes_zero_shot", "shapes_retrieval", "params:prompts",
                        "params:evaluation"],
                outputs="pretraining_metrics",
                name="evaluate_pretrained",
            ),
            Node(
                nodes.pretraining_metrics_for_mlflow,
                inputs="pretraining_metrics",
                outputs="pretraining_mlflow_metrics",
                name="track_pretraining_metrics",
                tags=["tracking"],
            ),
        ],
        tags="pretraining",
    )
