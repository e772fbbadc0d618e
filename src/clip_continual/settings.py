"""Kedro project settings."""

import copy
import warnings
from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.utils import find_kedro_project
from omegaconf import OmegaConf

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
        if key != "parameters":
            return super().__getitem__(key)
        parameters = super().__getitem__(key) if key in self else self._parameters_read_once()
        return {**parameters, RUNTIME_OVERRIDES: dict(self.runtime_params or {})}

    def _parameters_read_once(self) -> dict:
        """Kedro asks for the parameters several times while it starts a run, and parsing every
        benchmark's file takes about a second each time: they are read once per loader (per
        session) and a copy is handed out, so a caller that changes it changes nothing for the
        next. The catalog is read each time: its ``${run_key:}`` depends on the parameters."""
        self._read_parameters()
        return copy.deepcopy(self.__dict__["_parameters"])

    def base_parameters(self) -> dict:
        """The parameters of conf/base alone, without --params: every known key with its
        default (the schema). From the same reading of the files as the parameters."""
        self._read_parameters()
        return {**copy.deepcopy(self.__dict__["_base_parameters"]), RUNTIME_OVERRIDES: {}}

    def _read_parameters(self) -> None:
        if "_parameters" in self.__dict__:
            return
        base, env, base_path, env_path, files = self._read_raw_config("parameters")
        # merge, not unsafe_merge: the files' configs are merged again below
        base_only = OmegaConf.to_container(OmegaConf.merge(*base.values()), resolve=True) if base else {}
        self.__dict__["_base_parameters"] = base_only
        self.__dict__["_parameters"] = self._resolve_from_raw_config("parameters", base, env, base_path, env_path, files)


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
