from kedro.pipeline import Node, Pipeline

from clip_continual.pipelines.data_preparation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    inputs = ["params:data_preparation", "params:seed"]
    return Pipeline(
        [
            Node(nodes.generate_pretraining_corpus, inputs, "pretraining_corpus",
                 name="generate_pretraining_corpus"),
            Node(nodes.generate_shapes_zero_shot_set, inputs, "shapes_zero_shot",
                 name="generate_shapes_zero_shot_set"),
            Node(nodes.generate_shapes_retrieval_set, inputs, "shapes_retrieval",
                 name="generate_shapes_retrieval_set"),
            Node(nodes.generate_shapes_reference_set, inputs, "reference_set",
                 name="generate_shapes_reference_set"),
            Node(nodes.prepare_digits, inputs, ["digits_train", "digits_test"], name="prepare_digits"),
        ],
        tags="data_preparation",
    )
