"""Short keys that tell runs of different methods or settings apart on disk.

Artifacts of a continual run (per-task checkpoints and evaluations) live under
``<benchmark>/<run key>/``, so an `ft` run never overwrites a `vr_lwf` run's checkpoints, and
`kedro run --only-missing-outputs` only resumes a run with exactly the same settings.

The model every continual run starts from lives under ``pretrained/<source key>/``: the
architecture plus a hash of where its weights come from (weights file, pretraining settings),
so loading other weights never overwrites the embedded pretrained model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Parameters that change how a run is shown, where it is tracked or what it runs on, not what it
# computes (at any depth, so every benchmark's block too). ``distributed`` only splits the same
# global batch over workers: a run resumed with another worker count reuses its finished tasks.
# The command line's --params are already in the values they change. ``evaluate_checkpoints``
# trains nothing: its settings leave the training runs' keys as they are. The speed switches of
# ``training/speed.py`` change the floating-point rounding only (tf32, which drops precision as
# ``precision`` does, stays in the key).
SPEED_SWITCHES = frozenset({"compile", "compile_backend", "channels_last", "fused", "activation_checkpointing"})
NON_SCIENTIFIC_KEYS = frozenset({"progress", "device", "log_every", "tracking", "compare", "reporting",
                                 "runtime_overrides", "distributed", "pin_memory", "persistent_workers",
                                 "evaluate_checkpoints", *SPEED_SWITCHES})
DEFAULT_RUN_KEY = "default"

_current: str | None = None
_current_source: str | None = None


def _scientific(value: Any) -> Any:
    """``value`` without the keys above, at any depth; a block left empty goes too (a
    ``--params <block>.distributed.workers=2`` under a block conf/ does not have changes nothing)."""
    if isinstance(value, dict):
        kept = {k: _scientific(v) for k, v in sorted(value.items()) if k not in NON_SCIENTIFIC_KEYS}
        return {k: v for k, v in kept.items() if v != {}}
    if isinstance(value, (list, tuple)):
        return [_scientific(v) for v in value]
    return value


def _own_method_only(continual: Any, method: Any) -> Any:
    if not isinstance(continual, dict) or not isinstance(continual.get("methods"), dict):
        return continual
    return {**continual, "methods": {k: v for k, v in continual["methods"].items() if k == method}}


def _only_the_run_method(params: dict[str, Any]) -> dict[str, Any]:
    """Drop the other methods' options (``<block>.methods`` of every ``continual_learning``
    block, the named benchmarks' included): they change nothing here."""
    method, trimmed = params.get("method"), dict(params)
    if "continual_learning" in params:
        trimmed["continual_learning"] = _own_method_only(params["continual_learning"], method)
    for name, block in params.items():
        if isinstance(block, dict) and isinstance(block.get("continual_learning"), dict):
            trimmed[name] = {**block, "continual_learning": _own_method_only(block["continual_learning"], method)}
    return trimmed


def compute_run_key(params: dict[str, Any]) -> str:
    """``<method>-<hash of every parameter that affects the results>``."""
    scientific = _scientific(_only_the_run_method(params))
    digest = hashlib.sha256(json.dumps(scientific, sort_keys=True, default=str).encode())
    return f"{params.get('method', 'run')}-{digest.hexdigest()[:10]}"


def set_current_run_key(key: str | None) -> None:
    global _current
    _current = key


def current_run_key() -> str:
    """The resolver behind ``${run_key:}`` in catalog.yml (set by a hook from the parameters;
    without hooks, as in `kedro viz run`, computed from the project's configured parameters)."""
    return _current or _from_project_parameters(compute_run_key)


def _weights_file(pretrained: Any) -> dict[str, Any] | None:
    """A local weights file's size and modification time: replacing it changes the key."""
    if not isinstance(pretrained, str) or not pretrained:
        return None
    path = Path(pretrained).expanduser()
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# The embedded start model's settings, and with the seed the parameters ``compute_source_key``
# reads: a run that loads the start model reads them all.
START_MODEL_BLOCKS = ("model", "pretraining", "data_preparation")
SOURCE_KEY_PARAMETERS = (*START_MODEL_BLOCKS, "seed")


def compute_source_key(params: dict[str, Any]) -> str:
    """``<architecture>-<hash of the weights source and, when pretraining, its settings>``."""
    model = dict(params.get("model") or {})
    pretraining = dict(params.get("pretraining") or {})
    source: dict[str, Any] = {
        "architecture": model.get("architecture"),
        "pretrained": model.get("pretrained"),
        "weights_file": _weights_file(model.get("pretrained")),
    }
    if pretraining.pop("enabled", True):
        data = params.get("data_preparation") or {}
        corpus = {"shapes": data.get("shapes"), "image_size": data.get("image_size")}
        if (data.get("glyphs") or {}).get("count"):  # printed digits change the corpus
            corpus["glyphs"] = data["glyphs"]
        source |= {"pretraining": pretraining, "seed": params.get("seed"), "corpus": corpus}
    digest = hashlib.sha256(json.dumps(_scientific(source), sort_keys=True, default=str).encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model.get("architecture") or "model"))
    return f"{name}-{digest.hexdigest()[:10]}"


def set_current_source_key(key: str | None) -> None:
    global _current_source
    _current_source = key


def current_source_key() -> str:
    """The resolver behind ``${source_key:}`` in catalog.yml (set by a hook from the parameters;
    without hooks, computed from the project's configured parameters)."""
    return _current_source or _from_project_parameters(compute_source_key)


def _from_project_parameters(compute: Any) -> str:
    params = project_parameters()
    return compute(params) if params else DEFAULT_RUN_KEY


def project_parameters(start: Path | None = None) -> dict[str, Any]:
    """The parameters of the Kedro project around ``start`` (default: the working folder) in
    ``$KEDRO_ENV`` (default ``local``) over ``base``, as `kedro run` reads them without
    ``--params``; empty outside a project."""
    from kedro.config import OmegaConfigLoader
    from kedro.utils import find_kedro_project

    project = find_kedro_project(start or Path.cwd())
    if project is None:
        return {}
    loader = OmegaConfigLoader(
        str(Path(project) / "conf"), base_env="base",
        default_run_env=os.environ.get("KEDRO_ENV", "local"), merge_strategy={"parameters": "soft"},
    )
    try:
        return dict(loader["parameters"])
    except Exception as error:  # a broken file is reported by the run itself
        logger.warning("could not read the project's parameters for the run keys: %s", error)
        return {}


def run_name(what: str, method: str | None = None, alpha: Any = None, seed: Any = None,
             settings: dict[str, Any] | None = None) -> str:
    """What a run ran, as MLflow names it and the plots title it, e.g. ``vr_lwf alpha=1 seed=0 on
    digits_mst``: what tells runs apart first, so that MLflow's runs table, whose run-name column
    shows about 22 characters, shows it; ``what`` (the benchmark) last. A run without a continual
    sequence is named by its pipelines (``data_preparation+pretraining seed=0``). A method
    without a distillation weight (``ft``) gets no ``alpha``."""
    if method is None:
        return " ".join(part for part in (what, None if seed is None else f"seed={seed}") if part)
    parts = [method, None if alpha is None else f"alpha={_short(alpha)}",
             *(f"{key}={_short(value)}" for key, value in sorted((settings or {}).items())),
             None if seed is None else f"seed={seed}", f"on {what}"]
    return " ".join(str(part) for part in parts if part is not None)


def _short(value: Any) -> str:
    """A number as short as it reads: 1.0 -> 1, 0.5 -> 0.5."""
    return format(value, "g") if isinstance(value, float) else str(value)


def run_name_of(recipe: Any, pipeline_names: list[str] | None, params: dict[str, Any],
                overrides: dict[str, Any] | None = None) -> str:
    """The name of a run: from its resolved ``recipe`` (``runtime/recipe.py``), so the benchmark
    in force's alpha and seed, never the shared top-level ones; without a continual sequence
    (``recipe`` None), its pipelines and the top-level seed of ``params``."""
    if recipe is None:
        return run_name("+".join(pipeline_names or ["__default__"]), seed=params.get("seed"))
    settings = recipe.tasks[0].settings
    return run_name(recipe.benchmark, recipe.method, settings.get("alpha"), settings["seed"], overrides)
