"""Kedro pipelines: thin nodes over the science folders, one package per pipeline, and the project
hooks (run keys, checks before a run, MLflow tracking through kedro-mlflow)."""

from __future__ import annotations

import inspect
from functools import wraps
from typing import Any, Callable


def bind(func: Callable[..., Any], **fixed: Any) -> Callable[..., Any]:
    """``func`` with some keyword arguments fixed at pipeline-creation time (a task's index,
    a benchmark's phases).

    A plain function (not a ``functools.partial``), so kedro viz shows ``func``'s source:
    it reads the code of functions only, following ``__wrapped__``. Its signature lacks the
    fixed arguments, so Kedro matches the node's inputs against the rest.
    """
    signature = inspect.signature(func)
    unknown = sorted(set(fixed) - set(signature.parameters))
    if unknown:
        raise TypeError(f"{func.__name__}() has no parameters {unknown} to fix")

    @wraps(func)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs, **fixed)

    bound.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name not in fixed]
    )
    # kedro viz names the file of the function it is given: make that ``func``'s file (a
    # traceback then shows this frame at ``func``'s definition, under its name).
    bound.__code__ = bound.__code__.replace(
        co_filename=func.__code__.co_filename, co_firstlineno=func.__code__.co_firstlineno,
        co_name=func.__code__.co_name, co_qualname=func.__code__.co_qualname,
    )
    return bound
