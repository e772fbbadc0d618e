"""Custom Kedro datasets: model checkpoints, numpy array bundles and prepared image splits; the
catalog names them by this package (``clip_continual.io.NpzDataset``)."""

from clip_continual.io.datasets import CheckpointDataset, NpzDataset
from clip_continual.io.prepared import PreparedSplitDataset

__all__ = ["CheckpointDataset", "NpzDataset", "PreparedSplitDataset"]
