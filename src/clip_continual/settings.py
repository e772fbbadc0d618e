"""Kedro project settings."""

import warnings
from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.utils import find_kedro_project

from clip_continual.runtime.recipe import RUNTIME_OVERRIDES
from clip_continual.pipelines.hooks import MlflowTrackingHook, RunKeyHook, SettingsCheckHook
from clip_continual.runtime.run_key import current_run_key, current_source_key
from clip_continual.runtime.tracking import default_artifact_location, tracking_uri

# Our dotted dataset names are the namespaces' own (<benchmark>.<task>.model); Kedro warns when a
# node outside the namespace (the report) refers to them by their full name.
warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")

# kedro-mlflow's hook comes in as the project's own subclass (run names, status, checks).
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")  # its metadata name, either spelling
HOOKS = (RunKeyHook(), SettingsCheckHook(), MlflowTrackingHook())


def default_tracking_store() -> str:
    """``${tracking_store:}`` in mlflow.yml: `MLFLOW_TRACKING_URI` if set, else the project's
    SQLite file (found from a subfolder too)."""
    return tracking_uri(None, find_kedro_project(Path.cwd()) or Path.cwd())


def default_artifact_store() -> str | None:
    """``${artifact_store:}``: `mlartifacts/` beside a SQLite store; a server's own otherwise."""
    return default_artifact_location(default_tracking_store())


class ProjectConfigLoader(OmegaConfigLoader):
    """Kedro's OmegaConfigLoader that also hands the command line's ``--params``, as given, to
    the nodes as ``params:runtime_overrides``: they win over every level of a recipe
    (``clip_continual.runtime.recipe``), not only over the key they name."""

    def __getitem__(self, key: str):
        config = super().__getitem__(key)
        if key == "parameters":
            config = {**config, RUNTIME_OVERRIDES: dict(self.runtime_params or {})}
        return config


CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # `kedro run --params a.b=1` replaces one nested key and keeps its siblings.
    "merge_strategy": {"parameters": "soft"},
    "custom_resolvers": {
        "run_key": current_run_key,
        "source_key": current_source_key,
        "tracking_store": default_tracking_store,
        "artifact_store": default_artifact_store,
    },
}
