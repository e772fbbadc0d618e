"""A named benchmark's data and starting model: check every input, read the raw splits,
prepare each split once as shards, load the pretrained CLIP, decode the reference set."""

from clip_continual.pipelines.benchmark_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
