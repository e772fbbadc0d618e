from clip_continual.pipelines.continual_learning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
