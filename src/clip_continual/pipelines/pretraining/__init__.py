"""The CLIP every continual run starts from: pretrained on the embedded corpus (or loaded
from its weights), stored under the key of its source settings."""

from clip_continual.pipelines.pretraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]
