from clip_continual.pipelines.data_preparation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
