"""The continual sequence of a benchmark: one namespaced chain per task that fine-tunes the
model handed on by the previous task and evaluates the result."""

from clip_continual.pipelines.continual_learning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
