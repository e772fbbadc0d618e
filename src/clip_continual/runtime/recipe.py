"""The recipe of a run: every training and method setting each task of a benchmark uses, and
where each value came from.

One precedence, deep-merged, lowest first:

1. the shared defaults: ``TrainingConfig``'s (the paper's) for the loop;
2. the method's defaults: its class's keyword defaults, which are its authors' published values;
3. the benchmark's block (``<benchmark>.continual_learning``; the embedded default's is the
   top-level ``continual_learning``), including ``method_options`` that hold for every method;
4. the benchmark's per-method block (``<block>.methods.<method>``): the method's options, and
   its own ``training``, ``alpha``, ``teacher`` for this benchmark;
5. per-task entries: ``<block>.task_training.<task>``, then
   ``<block>.methods.<method>.task_training.<task>`` (e.g. MoE-Adapters' rate per dataset);
6. ``--params``: a value the command line sets wins over every level above, wherever it is set.

Nothing replaces a whole block: each level changes only the keys it names. A setting is a
dotted key: ``training.<field>`` (``TrainingConfig``), ``method.<option>`` (the method's
hyper-parameters), ``distributed.<field>``, ``alpha``, ``teacher``, ``seed``, ``few_shot``,
``few_shot_seed``. Plain Python; no Kedro import.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping

from clip_continual.methods import method_class, method_takes_alpha
from clip_continual.runtime.benchmarks import Benchmark
from clip_continual.training.config import TrainingConfig
from clip_continual.training.distributed import DistributedConfig

# Keys of a per-method block that are not the method's options.
METHOD_BLOCK_KEYS = ("training", "task_training", "alpha", "teacher", "upstream")
# Keys of a benchmark's block that are settings of their own (the rest are sub-blocks).
TOP_SETTINGS = ("alpha", "teacher", "few_shot", "few_shot_seed")
# Setting -> None means "the method's default" here; for every other setting null is a value.
_NULL_KEEPS_DEFAULT = ("alpha", "method.")
_LOOP_FIELDS = tuple(f.name for f in fields(TrainingConfig)
                     if f.name not in ("method", "alpha", "method_options", "teacher", "seed"))
TRAINING_DEFAULTS_SOURCE = "default of TrainingConfig (clip_continual/training/config.py)"
TEACHER_CHOICES = ("auto", "previous", "pretrained")
# The parameter that holds the command line's ``--params`` as given (the config loader adds it).
RUNTIME_OVERRIDES = "runtime_overrides"


class RecipeError(ValueError):
    """A setting of the recipe is unknown or in the wrong place."""


@dataclass(frozen=True)
class TaskRecipe:
    """The settings one task trains with (dotted key -> value) and where each came from."""

    task: str
    settings: dict[str, Any]
    sources: dict[str, str]

    def training_config(self) -> TrainingConfig:
        """The loop's settings; raises ``TrainingConfigError`` naming a bad value."""
        return TrainingConfig.from_params({
            **{key.removeprefix("training."): value for key, value in self.settings.items()
               if key.startswith("training.")},
            "method": self.settings["method"], "alpha": self.settings.get("alpha"),
            "seed": self.settings["seed"], "teacher": self.settings["teacher"],
            "method_options": {key.removeprefix("method."): value for key, value in self.settings.items()
                               if key.startswith("method.")},
        })

    def distributed(self) -> dict[str, Any]:
        return {key.removeprefix("distributed."): value for key, value in self.settings.items()
                if key.startswith("distributed.")}


@dataclass(frozen=True)
class Recipe:
    """The recipe of ``method`` on ``benchmark``: one ``TaskRecipe`` per task, in order;
    ``upstream`` names the published scripts the benchmark's (and the method's) block follows."""

    benchmark: str
    method: str
    tasks: tuple[TaskRecipe, ...]
    upstream: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "method": self.method, "upstream": list(self.upstream),
                "tasks": [{"task": t.task, "settings": t.settings, "sources": t.sources} for t in self.tasks]}

    def params_to_log(self) -> dict[str, Any]:
        """One value per setting; a setting that differs between tasks is logged per task as
        ``<task>/<setting>`` (e.g. MTIL's learning rate per dataset)."""
        logged: dict[str, Any] = {"benchmark": self.benchmark}
        for key in self.tasks[0].settings:
            values = [t.settings.get(key) for t in self.tasks]
            if all(v == values[0] for v in values):
                logged[key] = values[0]
            else:
                logged.update({f"{t.task}/{key}": v for t, v in zip(self.tasks, values)})
        return logged


# --- each level as flat settings: dotted key -> (value, the parameter path it came from) ------

Flat = dict[str, tuple[Any, str]]


def _training_settings(training: Mapping[str, Any], path: str) -> Flat:
    """A ``training`` block: loop fields, its ``distributed`` block and ``method_options``."""
    flat: Flat = {}
    for key, value in training.items():
        if key == "distributed":
            flat.update({f"distributed.{k}": (v, f"{path}.distributed.{k}") for k, v in (value or {}).items()})
        elif key == "method_options":
            flat.update({f"method.{k}": (v, f"{path}.method_options.{k}") for k, v in (value or {}).items()})
        else:
            flat[f"training.{key}"] = (value, f"{path}.{key}")
    return flat


def _block_settings(block: Mapping[str, Any], path: str) -> Flat:
    """A benchmark's block without its per-method and per-task sub-blocks."""
    flat: Flat = {key: (block[key], f"{path}.{key}") for key in TOP_SETTINGS if key in block}
    flat.update(_training_settings(block.get("training") or {}, f"{path}.training"))
    flat.update({f"method.{k}": (v, f"{path}.method_options.{k}")
                 for k, v in (block.get("method_options") or {}).items()})
    return flat


def _method_block_settings(block: Mapping[str, Any], path: str) -> Flat:
    """A per-method block: its options, and its own training settings, alpha and teacher."""
    flat: Flat = {key: (block[key], f"{path}.{key}") for key in ("alpha", "teacher") if key in block}
    flat.update(_training_settings(block.get("training") or {}, f"{path}.training"))
    flat.update({f"method.{k}": (v, f"{path}.{k}") for k, v in block.items() if k not in METHOD_BLOCK_KEYS})
    return flat


def _levels(block: Mapping[str, Any], path: str, method: str, task: str) -> Iterator[Flat]:
    """Levels 3-5 of the precedence, lowest first."""
    yield _block_settings(block, path)
    own = (block.get("methods") or {}).get(method) or {}
    yield _method_block_settings(own, f"{path}.methods.{method}")
    entry = (block.get("task_training") or {}).get(task) or {}
    yield _training_settings(entry, f"{path}.task_training.{task}")
    entry = (own.get("task_training") or {}).get(task) or {}
    yield _training_settings(entry, f"{path}.methods.{method}.task_training.{task}")


def setting_leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping) and tree:
        for key, child in tree.items():
            yield from setting_leaves(child, (*path, *str(key).split(".")))  # `--params a.b=1` may stay dotted
    elif path:
        yield path, tree


def _as_tree(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    tree: Any = value
    for key in reversed(path):
        tree = {key: tree}
    return tree


def _command_line(overrides: Mapping[str, Any] | None, block_path: str, method: str, task: str) -> Flat:
    """The ``--params`` that reach this task's settings, at the top of the precedence."""
    prefix = tuple(block_path.split("."))
    flat: Flat = {}
    for path, value in setting_leaves(overrides or {}):
        if path[:len(prefix)] != prefix or len(path) == len(prefix):
            continue
        single = _as_tree(path[len(prefix):], value)
        for level in _levels(single, block_path, method, task):
            flat.update({k: (v, f"--params {'.'.join(path)}") for k, (v, _) in level.items()})
    return flat


# --- the shared and the method's defaults ---------------------------------------------------

@functools.lru_cache(maxsize=None)  # read by every task of every benchmark's check: once per method
def _defaults(method: str) -> Flat:
    """Levels 1-2: the loop's defaults and the method's own (its authors' values). Shared: read,
    never changed."""
    flat: Flat = {f"training.{f.name}": (_plain(getattr(TrainingConfig, f.name, f.default)), TRAINING_DEFAULTS_SOURCE)
                  for f in fields(TrainingConfig) if f.name in _LOOP_FIELDS}
    distributed = DistributedConfig()
    flat.update({f"distributed.{f.name}": (_plain(getattr(distributed, f.name)),
                                           "default of DistributedConfig (clip_continual/training/distributed.py)")
                 for f in fields(DistributedConfig)})
    flat.update({"teacher": ("auto", "the benchmark's teacher"), "few_shot": (None, "all training images"),
                 "few_shot_seed": (0, "default")})
    cls = method_class(method)
    where = f"default of {cls.__name__} ({inspect.getmodule(cls).__name__.replace('.', '/')}.py)"
    for name in cls.hyper_parameter_names():
        default = _init_default(cls, name)
        key = "alpha" if name == "alpha" else f"method.{name}"
        flat[key] = (default, where)
    return flat


def _init_default(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and name in inspect.signature(init).parameters:
            return _plain(inspect.signature(init).parameters[name].default)
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return dict(value) if isinstance(value, Mapping) else value


def _merge(settings: dict[str, Any], sources: dict[str, str], level: Flat) -> None:
    for key, (value, source) in level.items():
        if value is None and key.startswith(_NULL_KEEPS_DEFAULT) and key in settings:
            continue  # null: the method's default
        settings[key], sources[key] = _plain(value), source


def resolve_task(method: str, block: Mapping[str, Any], block_path: str, task: str, *, seed: int,
                 seed_source: str, default_teacher: str, overrides: Mapping[str, Any] | None = None) -> TaskRecipe:
    """The settings of ``task`` under the precedence above. ``block`` is the benchmark's
    ``continual_learning`` (found at ``block_path``), ``overrides`` the command line's
    ``--params`` (nested or dotted)."""
    settings: dict[str, Any] = {"method": method, "seed": seed}
    sources = {"method": "method", "seed": seed_source}
    for level in (_defaults(method), *_levels(block, block_path, method, task),
                  _command_line(overrides, block_path, method, task)):
        _merge(settings, sources, level)
    if not method_takes_alpha(method):
        settings.pop("alpha", None)  # one alpha for a sweep; ft has no distillation weight
        sources.pop("alpha", None)
    if settings["teacher"] not in TEACHER_CHOICES:
        raise RecipeError(f"unknown teacher '{settings['teacher']}' ({sources['teacher']}): "
                          f"choose one of {', '.join(TEACHER_CHOICES)}")
    if settings["teacher"] == "auto":
        settings["teacher"] = default_teacher
        sources["teacher"] += f" (auto: the benchmark's, {default_teacher})"
    return TaskRecipe(task, dict(sorted(settings.items())), dict(sorted(sources.items())))


def upstream_of(block: Mapping[str, Any], method: str) -> tuple[str, ...]:
    """What the benchmark's block and its per-method block say they follow."""
    own = ((block.get("methods") or {}).get(method) or {}).get("upstream")
    return tuple(str(u) for u in (block.get("upstream"), own) if u)


def block_path_of(benchmark: Benchmark) -> str:
    """Where the benchmark's ``continual_learning`` block lives in the parameters."""
    return f"{benchmark.params}.continual_learning" if benchmark.params else "continual_learning"


def seed_path_of(benchmark: Benchmark) -> str:
    return f"{benchmark.params}.seed" if benchmark.params else "seed"


def lookup(params: Mapping[str, Any], dotted: str) -> Any:
    value: Any = params
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def overridden(overrides: Mapping[str, Any] | None, dotted: str) -> bool:
    """Whether ``--params`` set ``dotted`` (or a block above it)."""
    wanted = tuple(dotted.split("."))
    return any(path[:len(wanted)] == wanted or wanted[:len(path)] == path for path, _ in setting_leaves(overrides or {}))


def resolve_recipe(benchmark: Benchmark, params: Mapping[str, Any], method: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Every task's recipe of ``method`` (default: ``params['method']``) on ``benchmark`` from
    the run's parameters (``params``, with ``--params`` already applied) and the ``--params``
    themselves (``overrides``), which win over every level."""
    method = method or params.get("method")
    block_path, seed_path = block_path_of(benchmark), seed_path_of(benchmark)
    block = lookup(params, block_path) or {}
    seed_source = f"--params {seed_path}" if overridden(overrides, seed_path) else seed_path
    tasks = tuple(
        resolve_task(method, block, block_path, task, seed=lookup(params, seed_path), seed_source=seed_source,
                     default_teacher=benchmark.default_teacher, overrides=overrides)
        for task in benchmark.task_names
    )
    return Recipe(benchmark.name, method, tasks, upstream_of(block, method))
