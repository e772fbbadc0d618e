"""Project commands: Kedro's own ``kedro run``, with a failure summarised in its last lines, and
``kedro data check`` / ``kedro data fetch`` for the benchmarks' datasets.

``kedro run`` takes every option of Kedro's command. When the run fails, the output ends with
one line that says what is wrong and how to fix it, instead of a traceback; ``--traceback`` (or
``CLIP_CONTINUAL_TRACEBACK=1``) shows the full traceback as well. Ctrl-C or SIGTERM mark the
run's MLflow run KILLED, never FINISHED.
"""

from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.cli.utils import _split_params

from clip_continual.files import atomic_write
from clip_continual.runtime import tracking

TRACEBACK_ENV = "CLIP_CONTINUAL_TRACEBACK"


@click.group(name="clip-continual")
def cli() -> None:
    """clip-continual's project commands."""


def _own_message(error: BaseException) -> str:
    """The message of the first error in the chain raised by this project (it names the cause
    and the fix), else the outermost error's last line (Kedro puts the cause last)."""
    current: BaseException | None = error
    seen = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith("clip_continual"):
            return str(current)
        current = current.__cause__ or current.__context__
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def error_summary(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return ("interrupted; the MLflow run (if any) is marked KILLED. Finished tasks are kept: "
                "`kedro run --only-missing-outputs` resumes from the first missing one.")
    return _own_message(error)


@cli.command(name="run", params=list(kedro_run.params), help=kedro_run.help,
             context_settings=kedro_run.context_settings)
@click.option("--traceback", "show_traceback", is_flag=True, help="On failure, print the full traceback too.")
@click.pass_context
def run(ctx: click.Context, show_traceback: bool, **kwargs) -> None:
    try:
        ctx.invoke(kedro_run, **kwargs)
    except (click.exceptions.Exit, click.ClickException):
        raise
    except BaseException as error:
        tracking.end_run_left_open(tracking.status_for(error))
        if isinstance(error, SystemExit):
            raise
        if show_traceback or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            click.echo(traceback.format_exc(), err=True)
        elif not isinstance(error, KeyboardInterrupt):
            click.echo(f"(full traceback: `kedro run --traceback ...` or {TRACEBACK_ENV}=1)", err=True)
        click.secho(f"Error: {error_summary(error)}", fg="red", err=True)
        ctx.exit(_exit_code(error))


def _exit_code(error: BaseException) -> int:
    """The shell's conventions: 128 + the signal's number, 1 for an error."""
    if isinstance(error, tracking.Terminated):
        return 143
    return 130 if isinstance(error, KeyboardInterrupt) else 1


@cli.command(name="recipe")
@click.option("--pipeline", "-p", "benchmark", default=None,
              help="The benchmark's pipeline (e.g. mtil_order1); default: the embedded default.")
@click.option("--method", "-m", default=None, help="The method; default: the parameters' `method`.")
@click.option("--params", default="", callback=_split_params,
              help="As for `kedro run`: key=value pairs, e.g. mtil_order1.continual_learning.training.lr=1e-4.")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (default: local).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: benchmark, method, tasks with settings and sources.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write to this file instead (stdout also carries Kedro's log lines).")
def recipe(benchmark: str | None, method: str | None, params: dict, env: str | None, as_json: bool,
           output: str | None) -> None:
    """Every training and method setting each task of a benchmark uses, and the file and key
    (or default, or --params) each comes from; runs nothing and opens no MLflow run."""
    from clip_continual.runtime import recipe_report
    from clip_continual.runtime.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK
    from clip_continual.runtime.recipe import RUNTIME_OVERRIDES, resolve_recipe
    from clip_continual.runtime.schema import check_parameters

    name = benchmark or DEFAULT_BENCHMARK
    if name not in BENCHMARKS:
        raise click.BadParameter(f"no benchmark '{name}'; known: {', '.join(sorted(BENCHMARKS))}", param_hint="--pipeline")
    with warnings.catch_warnings():  # OmegaConf's deprecation notices, not the user's concern here
        warnings.simplefilter("ignore", UserWarning)
        loader, folders = _config_loader(env, params)
        parameters, defaults = loader["parameters"], loader.base_parameters()
    try:
        check_parameters({**parameters, **({"method": method} if method else {})}, defaults)
        resolved = resolve_recipe(BENCHMARKS[name], parameters, method, parameters[RUNTIME_OVERRIDES])
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    located = recipe_report.parameter_files(folders, loader.config_patterns["parameters"], folders[0].parents[1])
    resolved = recipe_report.with_files(resolved, located)
    shown = recipe_report.as_json(resolved) if as_json else recipe_report.as_text(resolved)
    if output is None:
        click.echo(shown)
    else:
        atomic_write(output, lambda handle: handle.write((shown + "\n").encode()))


def _config_loader(env: str | None, runtime_params: dict):
    """The project's configuration loader (conf/base, then the environment, then ``--params``)
    and its folders in merge order, without a Kedro session: nothing is tracked or written."""
    from kedro.framework.project import settings
    from kedro.framework.startup import bootstrap_project
    from kedro.utils import find_kedro_project

    project = find_kedro_project(Path.cwd()) or Path.cwd()
    bootstrap_project(project)  # the project's settings (its config loader), as `kedro` does
    conf = project / settings.CONF_SOURCE
    args = dict(settings.CONFIG_LOADER_ARGS)
    env = env or args.get("default_run_env") or "local"
    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(conf), env=env, runtime_params=runtime_params, **args)
    return loader, [conf / args.get("base_env", "base"), conf / env]


@cli.group(name="data")
def data() -> None:
    """Fetch and check the datasets a benchmark reads."""


_PIPELINE = click.option("--pipeline", "pipeline", default=None, help="The benchmark (kedro run --pipelines NAME).")
_PARAMS = click.option("--params", "params", default="", callback=_split_params,
                       help="Parameter overrides, as for kedro run (e.g. mtil_order1.data.root=/data).")


def _project_parameters(params: dict) -> dict:
    from clip_continual.runtime.data_commands import project_parameters

    return project_parameters(Path.cwd(), params)


@data.command(name="check")
@_PIPELINE
@_PARAMS
def data_check(pipeline: str | None, params: dict) -> None:
    """One line per dataset the benchmark reads: OK, or what is wrong and how to fix it."""
    from clip_continual.runtime.data_commands import check_lines, data_benchmarks

    lines = []
    for name in [pipeline] if pipeline else data_benchmarks():
        try:
            lines += check_lines(name, _project_parameters(params), Path.cwd())
        except ValueError as error:  # DataCheckError and the readers' errors: one clear line
            raise click.ClickException(str(error)) from error
    for line in lines:
        click.secho(str(line), fg=None if line.ok else "red")
    if not all(line.ok for line in lines):
        raise click.exceptions.Exit(1)


@data.command(name="fetch")
@_PIPELINE
@click.option("--dataset", "datasets", multiple=True, help="Only this dataset (repeatable), e.g. cifar100.")
@_PARAMS
def data_fetch(pipeline: str | None, datasets: tuple[str, ...], params: dict) -> None:
    """Download (resumably) and verify what may be downloaded; print how to get the rest."""
    from clip_continual.runtime.data_commands import fetch_lines

    if not pipeline and not datasets:
        raise click.UsageError("name a benchmark (--pipeline NAME) or a dataset (--dataset NAME)")
    try:
        for line in fetch_lines(pipeline, datasets, _project_parameters(params), Path.cwd()):
            click.echo(line)
    except ValueError as error:  # DataCheckError, FetchError: one clear line
        raise click.ClickException(str(error)) from error
