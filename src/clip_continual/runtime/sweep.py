"""Several methods over several seeds with one command: one Kedro session, hence one MLflow
run, per (method, seed). The pretrained model is stored under the key of its source settings
(seed included), so each seed's is trained once and reused by every method of that seed, in
whatever order; the runs still go seed by seed, so a stopped sweep leaves whole seeds.

    python -m clip_continual.sweep --methods ft lwf vr_lwf --seeds 0 1 2
    python -m clip_continual.sweep --methods vr_lwf "vr_lwf:continual_learning.alpha=0.5" --seeds 0 1 2
    kedro run --pipelines compare      # mean and standard deviation over the seeds

A method is a name from the registry, optionally followed by ``:`` and overrides in the syntax
of ``kedro run --params`` (``key=value`` pairs, comma-separated, dotted keys for nested ones).
``--params`` applies to every run.

The seed and the overrides go where the benchmark in force (``--pipeline``; the embedded
default otherwise) reads them: a named benchmark (``eurosat_mst``, ``mtil_order1``) reads its
own block, so ``--seeds 0 1`` sets ``eurosat_mst.seed`` and ``continual_learning.alpha=0.5``
becomes ``eurosat_mst.continual_learning.alpha=0.5`` (a key already under the benchmark's name
stays). Every run's parameters are checked against conf/base, and its recipe resolved, before
the first run starts: a typo in the last variant fails in seconds, naming the key and the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from clip_continual.runtime.benchmarks import Benchmark, benchmark_in_force
from clip_continual.runtime.recipe import RUNTIME_OVERRIDES, lookup, resolve_recipe, seed_path_of
from clip_continual.runtime.schema import check_parameters

logger = logging.getLogger(__name__)


def parse_params(text: str | None) -> dict[str, Any]:
    """``a.b=1,c=x`` -> ``{"a": {"b": 1}, "c": "x"}``, as ``kedro run --params`` reads it."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    malformed = [item for item in items if "=" not in item or not item.partition("=")[0].strip()]
    if malformed:
        raise ValueError(f"parameter overrides must read key=value, got {malformed}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def merge_params(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested merge: an override replaces one leaf and keeps its siblings."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_params(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class Variant:
    """A method with its own parameter overrides, e.g. ``vr_lwf:continual_learning.alpha=0.5``."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        method, _, overrides = spec.partition(":")
        if not method.strip():
            raise ValueError(f"'{spec}' names no method; write e.g. vr_lwf or vr_lwf:continual_learning.alpha=0.5")
        return cls(method.strip(), parse_params(overrides))


def check_methods(variants: Sequence[Variant]) -> None:
    """Every method must be registered: fail before the first (long) run, not in the middle."""
    from clip_continual.methods import METHODS

    unknown = sorted({v.method for v in variants} - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")


class SweepError(ValueError):
    """A planned run's parameters are wrong; the message names the run and the key."""


def _tree(dotted: str, value: Any) -> dict[str, Any]:
    tree: Any = value
    for key in reversed(dotted.split(".")):
        tree = {key: tree}
    return tree


def place_for(benchmark: Benchmark, overrides: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` where ``benchmark`` reads them: a top-level block that the benchmark's own
    block replaces (its ``continual_learning``, ``model``, ``seed`` ...: the keys of
    ``<benchmark>`` in conf/base) moves under the benchmark's name; the rest stays."""
    own = (defaults.get(benchmark.params) or {}) if benchmark.params else {}
    placed: dict[str, Any] = {}
    for key, value in overrides.items():
        moved = key in own and key != benchmark.params
        if moved:
            logger.info("sweep: %s.%s is what %s reads; the override goes there", benchmark.params, key,
                        benchmark.name)
        placed = merge_params(placed, {benchmark.params: {key: value}} if moved else {key: value})
    return placed


def planned_runs(variants: Sequence[Variant], seeds: Sequence[int], common: dict[str, Any] | None = None,
                 benchmark: Benchmark | None = None, defaults: Mapping[str, Any] | None = None
                 ) -> list[dict[str, Any]]:
    """The runtime parameters of every run, seed-major (a seed's pretraining is then reused),
    the seed and the overrides placed where ``benchmark`` (default: the embedded default's)
    reads them; ``defaults`` (conf/base) tells which blocks a named benchmark replaces."""
    if not variants or not seeds:
        raise ValueError("a sweep needs at least one method and one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    benchmark = benchmark or benchmark_in_force(None)
    common = place_for(benchmark, common or {}, defaults or {})
    placed = [merge_params(common, place_for(benchmark, variant.params, defaults or {})) for variant in variants]
    return [merge_params(overrides, merge_params({"method": variant.method}, _tree(seed_path_of(benchmark), int(seed))))
            for seed in seeds for variant, overrides in zip(variants, placed)]


def describe(run: Mapping[str, Any], benchmark: Benchmark) -> str:
    return f"method={run.get('method')} {seed_path_of(benchmark)}={lookup(run, seed_path_of(benchmark))}"


def sweep_parameters(project_path: Path, env: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The project's parameters as a run without ``--params`` reads them (``env``, default
    ``$KEDRO_ENV`` or local, over base) and those of conf/base alone (the schema)."""
    from kedro.config import OmegaConfigLoader

    def load(run_env: str) -> dict[str, Any]:
        with warnings.catch_warnings():  # OmegaConf's deprecation notices; the runs show them
            warnings.simplefilter("ignore", UserWarning)
            return dict(OmegaConfigLoader(str(project_path / "conf"), base_env="base", default_run_env=run_env,
                                          merge_strategy={"parameters": "soft"})["parameters"])

    return load(env or os.environ.get("KEDRO_ENV") or "local"), load("base")


def check_runs(runs: Sequence[dict[str, Any]], project: Mapping[str, Any], defaults: Mapping[str, Any],
               benchmark: Benchmark) -> None:
    """Every run's parameters (``project`` with the run's own over it, as Kedro merges them)
    against conf/base, and its recipe on ``benchmark``: a bad key fails before the first run,
    not hours later when its run starts."""
    def check(run: dict[str, Any]) -> None:
        params = {**merge_params(dict(project), run), RUNTIME_OVERRIDES: run}
        check_parameters(params, defaults)
        for task in resolve_recipe(benchmark, params, overrides=run).tasks:
            task.training_config()

    _check_each(runs, benchmark, check)


def check_runs_read(runs: Sequence[dict[str, Any]], pipeline: str, benchmark: Benchmark) -> None:
    """Every run's overrides reach ``pipeline`` (the project bootstrapped): a key it does not
    read fails the sweep before its first run, as `kedro run` would fail that run."""
    from clip_continual.pipeline_registry import parameters_read
    from clip_continual.runtime.preflight import check_overrides_read

    read = parameters_read([pipeline])
    _check_each(runs, benchmark, lambda run: check_overrides_read(run, read, pipeline))


def _check_each(runs: Sequence[dict[str, Any]], benchmark: Benchmark, check: Callable[[dict[str, Any]], None]) -> None:
    """``check`` on every run; the first that fails stops the sweep with a message naming it."""
    for number, run in enumerate(runs, start=1):
        try:
            check(run)
        except ValueError as error:
            raise SweepError(f"sweep run {number}/{len(runs)} ({describe(run, benchmark)}) on {benchmark.name}: "
                             f"{error}") from error


def run_sweep(project_path: Path, runs: Sequence[dict[str, Any]], pipeline: str | None = None,
              env: str | None = None) -> None:
    """Each run in its own Kedro session (one MLflow run each), one after the other."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_path)
    benchmark = benchmark_in_force([pipeline] if pipeline else None)
    check_runs_read(runs, pipeline or "__default__", benchmark)
    for number, params in enumerate(runs, start=1):
        logger.info("Sweep run %d/%d on %s: %s", number, len(runs), benchmark.name, describe(params, benchmark))
        with KedroSession.create(project_path=project_path, env=env, runtime_params=params) as session:
            session.run(pipeline_names=[pipeline] if pipeline else None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", required=True,
                        help="method names, each optionally with :key=value overrides")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--params", default=None, help="overrides for every run, as in kedro run --params")
    parser.add_argument("--pipeline", default=None, help="the pipeline to run (default: __default__)")
    parser.add_argument("--env", default=None, help="Kedro configuration environment")
    parser.add_argument("--project-path", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    project_path = args.project_path.resolve()
    try:
        variants = [Variant.parse(spec) for spec in args.methods]
        check_methods(variants)
        benchmark = benchmark_in_force([args.pipeline] if args.pipeline else None)
        project, defaults = sweep_parameters(project_path, args.env)
        runs = planned_runs(variants, args.seeds, parse_params(args.params), benchmark, defaults)
        check_runs(runs, project, defaults, benchmark)
    except ValueError as error:
        parser.error(str(error))
    run_sweep(project_path, runs, args.pipeline, args.env)


if __name__ == "__main__":
    main()
