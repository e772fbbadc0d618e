"""Parameter checks that run before any node: a typo or an impossible value fails at once,
with one message naming the setting, what is wrong and how to fix it.

The schema is conf/base itself: the known keys are the keys of the parameter files in
conf/base, and a value must have its default's type (a block stays a block, a number stays a
finite number, a switch stays true/false). Range rules belong to the config dataclass that
reads a block (TrainingConfig, PretrainingConfig, VocabularyConfig) and are run from
``BLOCK_CHECKS``.

How to add a parameter: give it its default in a conf/base/parameters*.yml file (every
setting has one there) and read it where it is needed; that makes the key known. If it has a
range, check it in its config dataclass (or add a rule to ``BLOCK_CHECKS``). A block whose keys
are the user's own (class prompts per dataset, a method's options) goes in ``OPEN_BLOCK_NAMES``.

Plain Python; no Kedro import.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable, Iterator, Mapping

# Blocks whose keys are chosen by the user, not by the project (named by their last key, at any
# depth: ``mtil_order1.prompts``, ``<block>.methods.<method>.task_training``); only their values are
# checked, the task's recipe checks the rest.
OPEN_BLOCK_NAMES = frozenset({"prompts", "method_options", "task_training", "ray_init", "runtime_overrides"})


def is_open_block(name: str) -> bool:
    return name.rpartition(".")[2] in OPEN_BLOCK_NAMES


FIX_HINT = "Fix it in conf/ (parameters*.yml) or in --params."


class ParameterError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any) -> Any:
    """YAML 1.1 and the command line hand over '1e-4' or 'inf' as strings."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _non_finite(value: Any) -> bool:
    if _is_number(value):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    return False


def _unknown_key(name: str, key: str, known: list[str]) -> str:
    parent = name.rpartition(".")[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
    block = f" of '{parent}'" if parent else " at the top level"
    return f"unknown parameter '{name}'{hint}; known keys{block}: {', '.join(sorted(known))}"


def _type_problem(name: str, value: Any, default: Any) -> str | None:
    """What is wrong with ``value`` given its default's type, or None."""
    if not isinstance(value, Mapping) and _non_finite(_as_number(value)):
        return f"'{name}' must be finite, got {value!r}"
    if default is None or value is None and not isinstance(default, Mapping):
        return None  # a null default takes any value; null switches a setting to its fallback
    expected = (
        "a block of settings" if isinstance(default, Mapping)
        else "true or false" if isinstance(default, bool)
        else "a number" if _is_number(default)
        else "a list" if isinstance(default, (list, tuple))
        else "a string" if isinstance(default, str)
        else None
    )
    fits = {
        "a block of settings": isinstance(value, Mapping),
        "true or false": isinstance(value, bool),
        "a number": _is_number(_as_number(value)),
        "a list": isinstance(value, (list, tuple)),
        "a string": isinstance(value, str),
        None: True,
    }[expected]
    return None if fits else f"'{name}' must be {expected} (default: {default!r}), got {value!r}"


def schema_problems(params: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every key of ``params`` checked against ``defaults`` (conf/base), recursively."""
    problems: list[str] = []
    for key, value in params.items():
        name = f"{prefix}{key}"
        if is_open_block(name):
            if not isinstance(value, Mapping):
                problems.append(f"'{name}' must be a block of settings, got {value!r}")
            elif _non_finite(value):
                problems.append(f"'{name}' holds a value that is not finite: {value!r}")
            continue
        if key not in defaults:
            problems.append(_unknown_key(name, str(key), [str(k) for k in defaults]))
            continue
        problem = _type_problem(name, value, defaults[key])
        if problem:
            problems.append(problem)
        elif isinstance(value, Mapping) and isinstance(defaults[key], Mapping):
            problems += schema_problems(value, defaults[key], f"{name}.")
    return problems


# --- range rules of each block (the config dataclasses own most of them) --------------------

def _check_method(params: Mapping[str, Any]) -> None:
    from clip_continual.methods import method_class

    method_class(params.get("method"))


def benchmark_continual_blocks(params: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(name, its ``continual_learning``) of every named benchmark's parameters block."""
    for name, block in params.items():
        own = block.get("continual_learning") if isinstance(block, Mapping) else None
        if name != "continual_learning" and isinstance(own, Mapping):
            yield name, own


def _check_continual_learning(params: Mapping[str, Any]) -> None:
    """Every task's recipe of the run's method on every benchmark that has its block."""
    from clip_continual.runtime.benchmarks import BENCHMARKS
    from clip_continual.runtime.recipe import RUNTIME_OVERRIDES, block_path_of, lookup, resolve_recipe

    for benchmark in BENCHMARKS.values():
        if not isinstance(lookup(params, block_path_of(benchmark)), Mapping):
            continue
        task = None
        try:
            for task in resolve_recipe(benchmark, params, overrides=params.get(RUNTIME_OVERRIDES)).tasks:
                task.training_config()
        except ValueError as error:
            where = setting_source(task, str(error)) if task is not None else None
            raise ValueError(f"{where or block_path_of(benchmark)}: {error}") from error


def setting_source(task: Any, message: str) -> str | None:
    """Where the setting a recipe error names was set (``mtil_order1.continual_learning.methods.
    zscl.training.lr`` or ``--params ...``), with the task when tasks differ; None if unknown.
    The config dataclasses name a field by its short name (``lr must be ...``), which alone
    does not tell the user which of the five levels of the recipe to fix."""
    match = re.match(r"'?([A-Za-z_][\w]*)", message)
    if match is None:
        return None
    word = match.group(1)
    for key in (f"training.{word}", f"method.{word}", f"distributed.{word}", word):
        source = task.sources.get(key)
        if source is not None and not source.startswith("default"):
            return f"'{source}' (task {task.task})"
    return None


def _check_pretraining(params: Mapping[str, Any]) -> None:
    from clip_continual.training.pretraining import PretrainingConfig

    block = {k: v for k, v in (params.get("pretraining") or {}).items() if k != "enabled"}
    PretrainingConfig.from_params({**block, "seed": params.get("seed", 0)})


def _check_vocabulary(params: Mapping[str, Any]) -> None:
    from clip_continual.pipelines.vocabulary_replay.nodes import vocabulary_config

    vocabulary_config(dict(params.get("vocabulary_replay") or {}), params.get("method"), params.get("seed", 0))


def _check_sizes(params: Mapping[str, Any]) -> None:
    """Sizes and counts that no config dataclass reads as a whole."""
    rules = {
        ("seed",): 0,
        ("data_preparation", "image_size"): 8,
        ("data_preparation", "shapes", "corpus_size"): 1,
        ("data_preparation", "shapes", "zero_shot_per_class"): 1,
        ("data_preparation", "shapes", "retrieval_size"): 1,
        ("evaluation", "batch_size"): 1,
        ("evaluation", "retrieval_folds"): 1,
        ("tracking", "log_every"): 1,
    }
    for path, minimum in rules.items():
        value: Any = params
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ValueError(f"'{'.'.join(path)}' must be an integer >= {minimum}, got {value!r}")
    fraction = ((params.get("data_preparation") or {}).get("digits") or {}).get("test_fraction")
    if fraction is not None and not (_is_number(fraction) and 0 < fraction < 1):
        raise ValueError(f"'data_preparation.digits.test_fraction' must be between 0 and 1, got {fraction!r}")


def _check_evaluation_protocols(params: Mapping[str, Any]) -> None:
    """``evaluation.task_identity`` and ``label_space`` of every benchmark's block."""
    from clip_continual.evaluation.protocols import EvaluationProtocol, ProtocolError

    blocks = [(name, block.get("evaluation")) for name, block in params.items() if isinstance(block, Mapping)]
    for name, evaluation in [("", params.get("evaluation")), *blocks]:
        if isinstance(evaluation, Mapping):
            try:
                EvaluationProtocol.from_params(evaluation)
            except ProtocolError as error:
                raise ValueError(f"{name + '.' if name else ''}{error}") from error


# Block name -> check of the whole parameter tree; raises ValueError naming the setting. Run
# in order, up to the first failure (a bad method would fail every block that depends on it).
BLOCK_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "method": _check_method,
    "continual_learning": _check_continual_learning,
    "pretraining": _check_pretraining,
    "vocabulary_replay": _check_vocabulary,
    "sizes": _check_sizes,
    "evaluation": _check_evaluation_protocols,
}


def with_inherited_method_options(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of every ``continual_learning`` block (the top level's and each named
    benchmark's): any method's options (those of ``continual_learning.methods``), and in each
    per-method block also its own ``training`` (the block's keys), ``alpha``, ``teacher`` and
    ``upstream`` (``clip_continual.runtime.recipe``)."""
    from clip_continual.methods import METHODS

    methods = (defaults.get("continual_learning") or {}).get("methods")
    if not isinstance(methods, Mapping):
        return dict(defaults)
    methods = {**{name: {} for name in METHODS}, **methods}  # a method without options has a block too
    inherited = dict(defaults)
    blocks = [("continual_learning", None, defaults["continual_learning"]), *(
        (name, name, own) for name, own in benchmark_continual_blocks(defaults))]
    for key, owner, block in blocks:
        per_method = {name: {**(options or {}), "training": block.get("training") or {}, "task_training": {},
                             "alpha": None, "teacher": "auto", "upstream": None}
                      for name, options in methods.items()}
        block = {"upstream": None, "method_options": {}, "task_training": {}, **block, "methods": per_method}
        if owner is None:
            inherited[key] = block
        else:
            inherited[owner] = {**defaults[owner], "continual_learning": block}
    return inherited


def check_parameters(params: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Raise one ``ParameterError`` listing every unknown key, wrong type, non-finite or
    out-of-range value of ``params`` (the run's parameters) against ``defaults`` (conf/base)."""
    problems = schema_problems(params, with_inherited_method_options(defaults))
    if not problems:  # range rules assume the types are right
        for block, check in BLOCK_CHECKS.items():
            try:
                check(params)
            except ValueError as error:
                message = str(error).rstrip(".")
                problems.append(message if block in message else f"{block}: {message}")
                break
    if problems:
        raise ParameterError(f"invalid parameters: {'; '.join(problems)}. {FIX_HINT}")
