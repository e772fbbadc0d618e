"""A Kedro dataset for prepared image splits (WebDataset shards plus a byte-offset index).

``save`` takes a ``ShardRequest`` (the raw split and how to prepare it) and writes the shards
atomically, or keeps the split already on disk when its fingerprint matches (same inputs and
size); ``load`` returns a ``PreparedSplit`` whose pixels are read on demand. The count of bad
images skipped goes to the log and to the active MLflow run.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from clip_continual.data.common import DataFormatError
from clip_continual.data.shards import MANIFEST, PreparedSplit, ShardRequest, prepare_split, read_manifest
from clip_continual.runtime.tracking import log_metrics


class PreparedSplitDataset(AbstractDataset[ShardRequest, PreparedSplit]):
    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = PurePosixPath(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def load(self) -> PreparedSplit:
        try:
            return PreparedSplit(Path(str(self._path)))
        except DataFormatError as error:
            raise DatasetError(str(error)) from error

    def save(self, data: ShardRequest) -> None:
        if not isinstance(data, ShardRequest):
            raise DatasetError(f"PreparedSplitDataset saves ShardRequest objects, got {type(data).__name__}")
        manifest = prepare_split(data.index, Path(str(self._path)), data.settings)
        name = Path(str(self._path)).name
        log_metrics({f"data/{name}/images": manifest["count"], f"data/{name}/bad_images": manifest["bad_images"]},
                    step=0)

    def _exists(self) -> bool:
        return read_manifest(Path(str(self._path))) is not None and (Path(str(self._path)) / MANIFEST).is_file()
