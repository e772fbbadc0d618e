from clip_continual.pipelines.vocabulary_replay.pipeline import create_pipeline

__all__ = ["create_pipeline"]
