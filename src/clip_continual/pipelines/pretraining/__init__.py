from clip_continual.pipelines.pretraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]
