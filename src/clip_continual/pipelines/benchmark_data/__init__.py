from clip_continual.pipelines.benchmark_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
