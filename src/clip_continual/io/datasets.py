"""Kedro datasets for CLIP checkpoints and for bundles of numpy arrays (.npz).

Both write atomically (temporary file in the target folder, then rename), so an interrupted
run never leaves a half-written artifact that a resumed run would mistake for a finished one.
Both formats are zip files: a file that is not a readable zip (truncated, corrupt) does not
count as existing, so ``kedro run --only-missing-outputs`` writes it again.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
from kedro.io import AbstractVersionedDataset, DatasetError, Version

from clip_continual.data.common import ImageSet
from clip_continual.files import atomic_write
from clip_continual.methods.vocabulary import ReplayVocabulary
from clip_continual.model.checkpoints import load_checkpoint, save_checkpoint
from clip_continual.model.clip import ClipModel, ModelError

logger = logging.getLogger(__name__)


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
        if self._missing_ok and not _readable_zip(self._get_load_path):
            if path.exists():
                logger.warning("'%s' is corrupt (not a readable checkpoint); it will be written again.", path)
            return None
        try:
            model = load_checkpoint(path)
        except ModelError as error:
            raise DatasetError(str(error)) from error
        model.origin = _identity(path)
        return model

    def save(self, data: ClipModel) -> None:
        if not isinstance(data, ClipModel):
            raise DatasetError(f"CheckpointDataset saves ClipModel objects, got {type(data).__name__}")
        path = Path(str(self._get_save_path()))
        if data.origin is not None and data.origin == _identity(path):
            return  # the model was loaded from this very file, which has not changed since
        save_checkpoint(data, path)

    def _exists(self) -> bool:
        return _readable_zip(self._get_load_path)


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
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            raise DatasetError(
                f"cannot read '{path}' ({error}); it is missing or corrupt. Rerun the node that "
                f"writes it (e.g. `kedro run --pipelines data_preparation`)."
            ) from error
        return arrays if self._kind == "arrays" else _NPZ_TYPES[self._kind].from_arrays(arrays)

    def save(self, data: Any) -> None:
        arrays = data if isinstance(data, dict) else data.to_arrays()
        write = np.savez_compressed if self._compress else np.savez
        size = sum(np.asarray(a).nbytes for a in arrays.values())
        atomic_write(Path(str(self._get_save_path())), lambda handle: write(handle, **arrays), size)

    def _exists(self) -> bool:
        return _readable_zip(self._get_load_path)


def _identity(path: Path) -> tuple[str, int, int] | None:
    """What tells whether a file changed: its resolved path, modification time and size."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _readable_zip(load_path: Callable[[], PurePosixPath]) -> bool:
    """The file exists and its zip directory reads (a truncated file fails here)."""
    try:
        path = Path(str(load_path()))
        if not path.is_file():
            return False
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
        return True
    except (DatasetError, OSError, zipfile.BadZipFile):
        return False
