"""The glue of ``kedro data check`` / ``kedro data fetch`` and of the check before ``kedro run``:
which datasets a benchmark reads (its raw splits) and where (its ``data`` parameters). The work
itself is done by ``clip_continual.data.check`` and ``clip_continual.data.fetch``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from clip_continual.data import check, fetch
from clip_continual.runtime.benchmarks import BENCHMARKS

PREPARED = Path("data") / "04_feature"  # where the catalog's prepared_{split} folders live


def _raw_splits(benchmark: str) -> tuple[str, ...]:
    from clip_continual.pipelines.benchmark_data.pipeline import raw_splits

    return raw_splits(BENCHMARKS[benchmark])


def project_parameters(project: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """conf/base + conf/local parameters, with ``overrides`` (as ``kedro run --params``)."""
    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loader = OmegaConfigLoader(conf_source=str(project / "conf"), base_env="base", default_run_env="local",
                                   runtime_params=overrides or {})
        return dict(loader["parameters"])


def data_benchmarks() -> list[str]:
    """The benchmarks that read data from disk (the embedded default reads none)."""
    return [name for name, benchmark in BENCHMARKS.items() if benchmark.params and _raw_splits(name)]


def benchmark_needs(benchmark: str, params: dict[str, Any], project: Path) -> list[check.Need]:
    if benchmark not in BENCHMARKS:
        raise check.DataCheckError(f"unknown pipeline '{benchmark}'; one of: {', '.join(data_benchmarks())}")
    if benchmark not in data_benchmarks():
        return []
    data = _absolute(dict(params[BENCHMARKS[benchmark].params]["data"]), project)
    return check.needs(_raw_splits(benchmark), data)


def _absolute(data: dict[str, Any], project: Path) -> dict[str, Any]:
    """Relative folders in the parameters are relative to the project, as in ``kedro run``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = _absolute(value, project)
        elif isinstance(value, str) and ("/" in value or key.endswith(("root", "json", "images"))):
            out[key] = str(project / value) if not Path(value).is_absolute() else value
        else:
            out[key] = value
    return out


def check_lines(benchmark: str, params: dict[str, Any], project: Path) -> list[check.CheckLine]:
    needs = benchmark_needs(benchmark, params, project)
    if not needs:
        return [check.CheckLine(benchmark, True, "reads no data from disk (generated or bundled)")]
    raws = [raw for need in needs for raw in need.raw_splits]
    return check.check_benchmark(raws, needs[0].data, project / PREPARED)


def fetch_lines(benchmark: str | None, datasets: tuple[str, ...], params: dict[str, Any], project: Path,
                progress: bool = True) -> list[str]:
    """Fetch the datasets of ``benchmark`` (or only ``datasets``; without a benchmark, each is
    placed where the first benchmark that reads it looks for it)."""
    names = [benchmark] if benchmark else data_benchmarks()
    found: dict[str, check.Need] = {}
    for name in names:
        for need in benchmark_needs(name, params, project):
            found.setdefault(need.key, need)
    unknown = [key for key in datasets if key not in found]
    if unknown:
        raise check.DataCheckError(f"no benchmark{' ' + benchmark if benchmark else ''} reads {unknown}; "
                                   f"datasets: {', '.join(sorted(found))}")
    chosen = [found[key] for key in datasets] if datasets else list(found.values())
    return [fetch.fetch_dataset(need.key, need.folder, progress) for need in chosen]


def check_before_run(params: dict[str, Any], pipeline_names: list[str] | None, project: Path) -> None:
    """The cheap part of ``kedro data check`` before a benchmark's first node: its folders are
    there (the room for what preparation writes: ``preparation_size``)."""
    for name in pipeline_names or ():
        needs = benchmark_needs(name, params, project) if name in BENCHMARKS else []
        if needs:
            check.require_present([raw for need in needs for raw in need.raw_splits], needs[0].data)


def preparation_size(params: dict[str, Any], pipeline_names: list[str] | None, project: Path) -> int:
    """The bytes preparing the benchmarks' splits not prepared yet will write under ``PREPARED``."""
    needs = [need for name in pipeline_names or () if name in BENCHMARKS
             for need in benchmark_needs(name, params, project)]
    return check.preparation_bytes(needs, project / PREPARED)
