"""Custom Kedro datasets: model checkpoints and numpy array bundles."""

from clip_continual.io.datasets import CheckpointDataset, NpzDataset

__all__ = ["CheckpointDataset", "NpzDataset"]
