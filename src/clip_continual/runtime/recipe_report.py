"""``kedro recipe``'s output: a recipe with the configuration file behind every value, as text
or JSON. Plain Python; no Kedro import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from clip_continual.runtime.recipe import Recipe, TaskRecipe


def _leaf_paths(tree: Any, path: str = "") -> Iterable[str]:
    if isinstance(tree, Mapping) and tree:
        for key, child in tree.items():
            yield from _leaf_paths(child, f"{path}.{key}" if path else str(key))
    elif path:
        yield path


def parameter_files(folders: Iterable[Path], patterns: Iterable[str], root: Path) -> dict[str, str]:
    """Dotted parameter key -> the file that sets it (relative to ``root``), over ``folders`` in
    the order Kedro merges them (an environment's file after conf/base's)."""
    located: dict[str, str] = {}
    for folder in folders:
        files = sorted({p for pattern in patterns for p in Path(folder).glob(pattern) if p.suffix in (".yml", ".yaml")})
        for file in files:
            tree = yaml.safe_load(file.read_text()) or {}
            shown = file.relative_to(root) if file.is_relative_to(root) else file
            located.update({key: str(shown) for key in _leaf_paths(tree)})
    return located


def with_files(recipe: Recipe, located: Mapping[str, str]) -> Recipe:
    """The recipe with each parameter source followed by its file (``key (file)``)."""
    def where(source: str) -> str:
        file = located.get(source.split(" (")[0])
        return f"{source} ({file})" if file else source

    tasks = tuple(TaskRecipe(t.task, t.settings, {k: where(s) for k, s in t.sources.items()}) for t in recipe.tasks)
    return Recipe(recipe.benchmark, recipe.method, tasks, recipe.upstream)


def as_json(recipe: Recipe) -> str:
    return json.dumps(recipe.as_json(), indent=2, default=str)


def _rows(keys: Iterable[str], task: TaskRecipe) -> list[str]:
    keys = list(keys)
    width = max((len(k) for k in keys), default=0)
    return [f"  {key:<{width}}  {task.settings[key]!r:<14}  {task.sources[key]}" for key in keys]


def as_text(recipe: Recipe) -> str:
    """The settings every task shares once, then each task's own values."""
    first = recipe.tasks[0]
    differ = [k for k in first.settings if any(t.settings.get(k) != first.settings[k]
                                               or t.sources.get(k) != first.sources[k] for t in recipe.tasks)]
    lines = [f"Recipe of {recipe.method} on {recipe.benchmark} ({len(recipe.tasks)} task(s))"]
    lines += [f"follows: {source}" for source in recipe.upstream]
    lines.append("Every task:" if not differ else "Every task (unless listed below):")
    lines += _rows((k for k in first.settings if k not in differ), first)
    for task in recipe.tasks if differ else ():
        lines.append(f"Task {task.task}:")
        lines += _rows(differ, task)
    return "\n".join(lines)
