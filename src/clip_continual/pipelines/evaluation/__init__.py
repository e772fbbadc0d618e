"""Reports of a finished continual sequence: the metrics table, the accuracy matrix, the
summary and their figures, and the whole-run metrics logged to MLflow."""

from clip_continual.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
