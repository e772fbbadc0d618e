"""Evaluation of given checkpoints (ours, ZSCL's or MoE-Adapters' releases) on a benchmark's
evaluation suite, with the reports a training run writes."""

from clip_continual.pipelines.evaluate_checkpoints.pipeline import create_pipeline, pipeline_name

__all__ = ["create_pipeline", "pipeline_name"]
