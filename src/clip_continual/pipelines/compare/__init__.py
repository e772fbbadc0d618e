"""Method comparison across finished MLflow runs: mean and standard deviation over seeds of
every method variant, as a table and a figure."""

from clip_continual.pipelines.compare.pipeline import create_pipeline

__all__ = ["create_pipeline"]
