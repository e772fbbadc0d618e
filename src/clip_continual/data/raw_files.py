"""Checks shared by the readers of users' raw dataset files, each failing with one clear message.

Every message names the file or folder, says what was expected there and how to fix it, and is
raised while an index is built, i.e. before any training starts. Plain Python; no Kedro import.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from clip_continual.data.common import DataFormatError


class MissingInputError(DataFormatError, FileNotFoundError):
    """A file or folder a dataset needs is not where its parameter points."""


class RawFormatError(DataFormatError):
    """A raw file exists but does not hold what its format promises (keys, splits, classes)."""


class EmptyDataError(RawFormatError):
    """A class folder or a split holds no example."""


def _require(path: str | Path, folder: bool, what: str, fix: str) -> Path:
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        found = "nothing" if not path.exists() else ("a file" if folder else "a folder")
        expected = "a folder" if folder else "a file"
        raise MissingInputError(f"{what}: expected {expected} at '{path}', found {found}. {fix}")
    return path


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """``path`` as a Path if it is a file; else MissingInputError naming ``what`` and ``fix``."""
    return _require(path, False, what, fix)


def require_folder(path: str | Path, what: str, fix: str) -> Path:
    """``path`` as a Path if it is a folder; else MissingInputError naming ``what`` and ``fix``."""
    return _require(path, True, what, fix)


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The parsed JSON document at ``path`` (which must exist and parse)."""
    path = require_file(path, what, fix)
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RawFormatError(f"{what}: '{path}' is not valid JSON ({error}). {fix}") from error


def require_keys(document: Any, keys: tuple[str, ...], path: str | Path, what: str, fix: str) -> None:
    """``document`` must be a JSON object holding a list under each of ``keys``."""
    if not isinstance(document, dict):
        raise RawFormatError(f"{what}: '{path}' must hold a JSON object with the keys {list(keys)}. {fix}")
    missing = [key for key in keys if not isinstance(document.get(key), list)]
    if missing:
        raise RawFormatError(
            f"{what}: '{path}' has no list under {missing} (expected {list(keys)}; found keys "
            f"{sorted(document)[:10]}). {fix}"
        )


_FIX_MAP = ("Write it as a JSON object {\"folder\": \"class name\", ...} or a CSV with the two "
            "columns folder,name.")


def _json_class_map(path: Path) -> dict[str, str]:
    mapping = read_json(path, "class map", _FIX_MAP)
    if isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values()):
        return {str(key): value.strip() for key, value in mapping.items()}
    # the widespread imagenet_class_index.json: {"0": ["n01440764", "tench"], ...}
    if isinstance(mapping, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in mapping.values()
    ):
        return {folder: name.replace("_", " ").strip() for folder, name in mapping.values()}
    raise RawFormatError(f"class map: '{path}' must hold a JSON object of strings. {_FIX_MAP}")


def _csv_class_map(path: Path) -> dict[str, str]:
    with require_file(path, "class map", _FIX_MAP).open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if rows and [cell.strip().lower() for cell in rows[0]] == ["folder", "name"]:
        rows = rows[1:]
    bad = next((number for number, row in enumerate(rows, start=1) if len(row) != 2), None)
    if bad is not None:
        raise RawFormatError(f"class map: data row {bad} of '{path}' does not have two columns. {_FIX_MAP}")
    return {folder.strip(): name.strip() for folder, name in rows}


def read_class_map(path: str | Path) -> dict[str, str]:
    """A folder-name -> class-name map from a JSON object, a two-column CSV (``folder,name``;
    the header row is optional) or an ``imagenet_class_index.json`` (index -> [folder, name])."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _json_class_map(path)
    if path.suffix.lower() == ".csv":
        return _csv_class_map(path)
    raise RawFormatError(f"class map: '{path}' must end in .json or .csv. {_FIX_MAP}")
