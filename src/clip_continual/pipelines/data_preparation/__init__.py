"""The embedded default's data, generated without download: digits for the continual tasks,
shapes for pretraining, zero-shot, retrieval and the reference set."""

from clip_continual.pipelines.data_preparation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
