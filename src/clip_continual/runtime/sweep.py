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
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

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


def planned_runs(variants: Sequence[Variant], seeds: Sequence[int],
                 common: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The runtime parameters of every run, seed-major (a seed's pretraining is then reused)."""
    if not variants or not seeds:
        raise ValueError("a sweep needs at least one method and one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    return [merge_params(merge_params(common or {}, variant.params),
                         {"method": variant.method, "seed": int(seed)})
            for seed in seeds for variant in variants]


def run_sweep(project_path: Path, runs: Sequence[dict[str, Any]], pipeline: str | None = None,
              env: str | None = None) -> None:
    """Each run in its own Kedro session (one MLflow run each), one after the other."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_path)
    for number, params in enumerate(runs, start=1):
        logger.info("Sweep run %d/%d: method=%s seed=%s", number, len(runs), params["method"], params["seed"])
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
    try:
        variants = [Variant.parse(spec) for spec in args.methods]
        check_methods(variants)
        runs = planned_runs(variants, args.seeds, parse_params(args.params))
    except ValueError as error:
        parser.error(str(error))
    run_sweep(args.project_path.resolve(), runs, args.pipeline, args.env)


if __name__ == "__main__":
    main()
