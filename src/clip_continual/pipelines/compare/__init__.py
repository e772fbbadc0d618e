from clip_continual.pipelines.compare.pipeline import create_pipeline

__all__ = ["create_pipeline"]
