"""clip-continual: continual learning of CLIP models. The science lives in model/, methods/,
training/, evaluation/ and data/; pipelines/, io/ and runtime/ run it with Kedro and MLflow."""
