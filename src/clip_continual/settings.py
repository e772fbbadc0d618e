"""Kedro project settings."""

import warnings

from kedro.config import OmegaConfigLoader

from clip_continual.hooks import MlflowTrackingHook, RunKeyHook, SettingsCheckHook
from clip_continual.run_key import current_run_key, current_source_key

# Our dotted dataset names are the namespaces' own (<benchmark>.<task>.model); Kedro warns when a
# node outside the namespace (the report) refers to them by their full name.
warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")

HOOKS = (RunKeyHook(), SettingsCheckHook(), MlflowTrackingHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # `kedro run --params a.b=1` replaces one nested key and keeps its siblings.
    "merge_strategy": {"parameters": "soft"},
    "custom_resolvers": {"run_key": current_run_key, "source_key": current_source_key},
}
