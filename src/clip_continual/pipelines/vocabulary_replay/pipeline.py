from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines.vocabulary_replay import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.build_replay_vocabulary,
                inputs=["pretrained_model", "params:vocabulary_replay", "params:method", "params:seed"],
                outputs="replay_vocabulary",
                name="build_replay_vocabulary",
            )
        ],
        tags="vocabulary_replay",
    )
