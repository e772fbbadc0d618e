"""The replayed vocabulary of the run's method (its published mode unless set), built once
with the pretrained model's context length and tokenizer and stored as a catalog artifact."""

from clip_continual.pipelines.vocabulary_replay.pipeline import create_pipeline

__all__ = ["create_pipeline"]
