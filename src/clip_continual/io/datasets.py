"""Kedro datasets for CLIP checkpoints and for bundles of numpy arrays (.npz).

Both write atomically (temporary file in the target folder, then rename), so an interrupted
run never leaves a half-written artifact that a resumed run would mistake for a finished one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io import AbstractVersionedDataset, DatasetError, Version

from clip_continual.data.common import ImageSet
from clip_continual.models import ClipModel, ModelError, load_checkpoint, save_checkpoint
from clip_continual.replay import ReplayVocabulary


class CheckpointDataset(AbstractVersionedDataset[ClipModel, ClipModel]):
    """A CLIP checkpoint: ``{architecture, model config, pretrained source, metadata, state_dict}``.

    Loaded with ``torch.load(weights_only=True)`` onto the CPU. ``missing_ok: true`` makes
    ``load`` return None when the file does not exist (a cache a node may reuse).
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        missing_ok: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self._missing_ok = missing_ok
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version, "missing_ok": self._missing_ok}

    def load(self) -> ClipModel | None:
        path = Path(str(self._get_load_path()))
        if self._missing_ok and not path.exists():
            return None
        try:
            return load_checkpoint(path)
        except ModelError as error:
            raise DatasetError(str(error)) from error

    def save(self, data: ClipModel) -> None:
        if not isinstance(data, ClipModel):
            raise DatasetError(f"CheckpointDataset saves ClipModel objects, got {type(data).__name__}")
        save_checkpoint(data, str(self._get_save_path()))

    def _exists(self) -> bool:
        try:
            return Path(str(self._get_load_path())).is_file()
        except DatasetError:
            return False


_NPZ_TYPES = {"image_set": ImageSet, "replay_vocabulary": ReplayVocabulary}


class NpzDataset(AbstractVersionedDataset[Any, Any]):
    """Objects that turn into a dict of numpy arrays, stored as one .npz (no pickle).

    ``kind`` names what the arrays make up: ``image_set``, ``replay_vocabulary`` or ``arrays``
    (the plain dict).
    """

    def __init__(
        self,
        filepath: str,
        kind: str = "arrays",
        compress: bool = False,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if kind != "arrays" and kind not in _NPZ_TYPES:
            raise DatasetError(f"unknown NpzDataset kind '{kind}'; use arrays, {', '.join(_NPZ_TYPES)}")
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self._kind = kind
        self._compress = compress
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "kind": self._kind, "version": self._version}

    def load(self) -> Any:
        path = Path(str(self._get_load_path()))
        try:
            with np.load(path, allow_pickle=False) as bundle:
                arrays = {name: bundle[name] for name in bundle.files}
        except (OSError, ValueError) as error:
            raise DatasetError(
                f"cannot read '{path}' ({error}); it is missing or corrupt. Rerun the node that "
                f"writes it (e.g. `kedro run --pipelines data_preparation`)."
            ) from error
        return arrays if self._kind == "arrays" else _NPZ_TYPES[self._kind].from_arrays(arrays)

    def save(self, data: Any) -> None:
        arrays = data if isinstance(data, dict) else data.to_arrays()
        path = Path(str(self._get_save_path()))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                (np.savez_compressed if self._compress else np.savez)(handle, **arrays)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _exists(self) -> bool:
        try:
            return Path(str(self._get_load_path())).is_file()
        except DatasetError:
            return False
