"""A short key that tells runs of different methods or settings apart on disk.

Artifacts of a continual run (per-task checkpoints and evaluations) live under
``<benchmark>/<run key>/``, so an `ft` run never overwrites a `vr_lwf` run's checkpoints, and
`kedro run --only-missing-outputs` only resumes a run with exactly the same settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Parameters that change how a run is shown or where it is tracked, not what it computes.
NON_SCIENTIFIC_KEYS = frozenset({"progress", "device", "log_every", "tracking", "compare", "reporting"})
DEFAULT_RUN_KEY = "default"

_current: str | None = None


def _scientific(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scientific(v) for k, v in sorted(value.items()) if k not in NON_SCIENTIFIC_KEYS}
    if isinstance(value, (list, tuple)):
        return [_scientific(v) for v in value]
    return value


def _only_the_run_method(params: dict[str, Any]) -> dict[str, Any]:
    """Drop the other methods' options (``continual_learning.methods``): they change nothing here."""
    continual = params.get("continual_learning")
    if not isinstance(continual, dict) or not isinstance(continual.get("methods"), dict):
        return params
    own = {k: v for k, v in continual["methods"].items() if k == params.get("method")}
    return {**params, "continual_learning": {**continual, "methods": own}}


def compute_run_key(params: dict[str, Any]) -> str:
    """``<method>-<hash of every parameter that affects the results>``."""
    scientific = _scientific(_only_the_run_method(params))
    digest = hashlib.sha256(json.dumps(scientific, sort_keys=True, default=str).encode())
    return f"{params.get('method', 'run')}-{digest.hexdigest()[:10]}"


def set_current_run_key(key: str | None) -> None:
    global _current
    _current = key


def current_run_key() -> str:
    """The resolver behind ``${run_key:}`` in catalog.yml (set by a hook from the parameters)."""
    return _current or DEFAULT_RUN_KEY
