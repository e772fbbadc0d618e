"""Kedro pipelines: thin nodes over the plain-Python modules of the package."""

from __future__ import annotations

from functools import partial, update_wrapper
from typing import Any, Callable


def bind(func: Callable[..., Any], **fixed: Any) -> Callable[..., Any]:
    """``func`` with some keyword arguments fixed at pipeline-creation time (a task's index,
    a benchmark's phases), keeping its name for logs and kedro viz."""
    return update_wrapper(partial(func, **fixed), func)
