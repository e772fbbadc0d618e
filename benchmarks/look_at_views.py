"""Look at a finished project as a researcher would: the MLflow UI and kedro-viz on 127.0.0.1,
opened in headless Chromium (playwright), with screenshots and checks of what the README's
"Looking at runs" promises: the runs table at the README's link, one name per metric in groups,
no bookkeeping tags on the run page, ``ft`` apart from the alphas in the compare plot, the
compare page's artifact list visible, and kedro-viz drawing the project's pipelines, and, started
on the benchmark of the newest run (``kedro viz run --pipeline``), that run's workflow and tags.

    pip install playwright   # and a Chromium: apt-get install chromium, or `playwright install chromium`
    python benchmarks/look_at_views.py PROJECT [--out FOLDER]

PROJECT is a project folder after at least one `kedro run` (its own ``mlflow.db``); the
screenshots go to FOLDER (default: PROJECT/data/08_reporting/views). Exits non-zero, naming
the check, when one fails. ``tests/test_views.py`` runs it where Chromium is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

EXPERIMENT = "clip-continual"
START_TIMEOUT_S = 480.0  # ~30 s each on 2 idle cores; minutes on a loaded machine
WIDE = {"width": 2200, "height": 1400}  # the compare page's artifact list needs a wide window
GROUPS = {"continual", "retrieval", "cost", "train"}
LAYERS = ("03_primary", "05_model_input", "06_models", "08_reporting")  # top to bottom


def chromium_path() -> str | None:
    """A system Chromium, else None (playwright then uses its own, if installed)."""
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def why_not_runnable() -> str | None:
    """None when playwright and a Chromium are here, else what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if chromium_path():
        return None
    try:
        with sync_playwright() as playwright:
            if Path(playwright.chromium.executable_path).is_file():
                return None
    except Exception as error:  # playwright without its browsers
        return f"no Chromium ({error.__class__.__name__})"
    return "no Chromium (apt-get install chromium, or `playwright install chromium`)"


def _free_port() -> int:
    """A free port below 49152: kedro-viz refuses the ephemeral range the system would pick."""
    for port in random.sample(range(20000, 49000), 200):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free TCP port between 20000 and 49000")


def _wait_for(url: str, process: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before answering at {url}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).close()
            return
        time.sleep(1)
    raise RuntimeError(f"{name} did not answer at {url} within {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def servers(project: Path, logs: Path, pipeline: str) -> Iterator[dict[str, str]]:
    """The MLflow UI on the project's store, ``kedro viz run`` and ``kedro viz run --pipeline
    PIPELINE`` (as the README opens it after a run of one benchmark), all on 127.0.0.1 and started
    together (each takes tens of seconds); stopped on leaving, whatever happened."""
    ports = {"mlflow": _free_port(), "viz": _free_port(), "viz_run": _free_port()}
    commands = {
        "mlflow": [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                   f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
                   "--workers", "1"],  # uvicorn's supervisor restarts busy workers in a loop on a loaded machine
        "viz": [sys.executable, "-m", "kedro", "viz", "run", "--host", "127.0.0.1", "--port", str(ports["viz"]),
                "--no-browser"],
    }
    commands["viz_run"] = [*commands["viz"][:-2], str(ports["viz_run"]), "--no-browser", "--pipeline", pipeline]
    logs.mkdir(parents=True, exist_ok=True)
    started: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "w") as log:
                started[name] = subprocess.Popen(command, cwd=project, stdout=log, stderr=subprocess.STDOUT,
                                                 env=os.environ | {"KEDRO_DISABLE_TELEMETRY": "true"})
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name, process in started.items():
            _wait_for(urls[name] + ("/health" if name == "mlflow" else "/"), process, name)
        yield urls
    finally:
        for process in started.values():
            process.terminate()
        for process in started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)


def _runs(project: Path) -> tuple[str, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"{project} has no MLflow experiment '{EXPERIMENT}': run `kedro run` there first")
    return experiment.experiment_id, client.search_runs([experiment.experiment_id])


class Checks:
    """Failed checks, collected (all are looked at, then reported together)."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def that(self, condition: bool, what: str) -> None:
        print(("ok    " if condition else "FAILED ") + what)
        if not condition:
            self.failed.append(what)


def _open(page: Any, url: str, shot: Path, wait_ms: int = 6000) -> str:
    page.goto(url)
    page.wait_for_timeout(wait_ms)  # the pages draw after their first load event
    _close_overlays(page)
    page.screenshot(path=str(shot))
    return page.inner_text("body")


# What the UIs open over the page on a first visit (MLflow's assistant panel, kedro-viz's "what's
# new" banner); closed, so the screenshots show the page. kedro-viz's tour stays (no close to find).
OVERLAYS = ("[aria-label='Close'] >> visible=true", "text=Dismiss >> visible=true")


def _close_overlays(page: Any) -> None:
    for selector in OVERLAYS:
        for _ in range(3):
            found = page.locator(selector)
            if not found.count():
                break
            with contextlib.suppress(Exception):
                found.first.click(timeout=2000)
            page.wait_for_timeout(500)


def _sections(text: str) -> dict[str, int]:
    """The run page's metric sections, ``name (count)``, as the page's text lays them out."""
    lines = [line.strip() for line in text.splitlines()]
    return {name: int(count.strip("()")) for name, count in zip(lines, lines[1:])
            if count.startswith("(") and count.endswith(")") and count.strip("()").isdigit() and name}


def look_at_mlflow(page: Any, url: str, project: Path, out: Path, checks: Checks) -> None:
    experiment, runs = _runs(project)
    text = _open(page, f"{url}/#/experiments/{experiment}/runs", out / "mlflow_runs_table.png")
    checks.that("Training runs" in text and all(run.info.run_name in text for run in runs),
                "the README's link (#/experiments/<id>/runs) lands on the runs table, every run listed")
    hidden = [name for name in (run.info.run_name for run in runs) if not _shows(page, name, name.partition(" on ")[0])]
    checks.that(not hidden, f"the run-name column shows what tells runs apart (method, alpha, seed){hidden or ''}")
    run = max(runs, key=lambda r: len(r.data.metrics))
    page_of_run = f"{url}/#/experiments/{experiment}/runs/{run.info.run_id}"
    text = _open(page, page_of_run, out / "mlflow_run_overview.png")
    checks.that("heartbeat" not in text and "clip_continual." not in text,
                "the run page lists no bookkeeping tags (heartbeat, host, pid)")
    text = _open(page, f"{page_of_run}/model-metrics", out / "mlflow_run_metrics.png")
    sections = _sections(text)
    checks.that(GROUPS <= set(sections), f"metrics in groups {sorted(GROUPS)} (page shows {sorted(sections)})")
    names = set(run.data.metrics)
    checks.that(not any(n.startswith(("continual/zs_acc/", "continual/retrieval", "continual/i2t")) for n in names)
                and sections.get("continual", 0) == sum(n.startswith("continual/") for n in names),
                "one name per metric: no per-set copy of a lone zero-shot or retrieval set")
    page.get_by_placeholder("Search metric charts").fill("train/lr")
    page.wait_for_timeout(2000)
    page.screenshot(path=str(out / "mlflow_train_lr.png"))
    checks.that(_sections(page.inner_text("body")).get("train") == 1, "train/lr has its chart")
    look_at_compare(page, url, experiment, runs, out, checks)


def _shows(page: Any, text: str, prefix: str) -> bool:
    """``text`` is drawn with at least ``prefix`` (and the ellipsis) in view: measured in the
    font the page draws it in, against the width the table gives it."""
    found = page.get_by_text(text, exact=True)
    return bool(found.count()) and found.first.evaluate(
        """(element, prefix) => {
            const context = document.createElement('canvas').getContext('2d');
            context.font = getComputedStyle(element).font;
            return context.measureText(prefix + '…').width <= element.getBoundingClientRect().width + 1;
        }""", prefix)


def _columns_aligned(page: Any, runs: int) -> bool:
    """Every row with a cell per run puts its cells at the same places, after scrolling (the
    compare page draws its header and its rows apart)."""
    page.mouse.wheel(0, 2500)
    page.wait_for_timeout(1000)
    rows = page.evaluate("""() => Array.from(document.querySelectorAll('tr')).map(
        row => Array.from(row.cells).slice(1).map(cell => Math.round(cell.getBoundingClientRect().left)))""")
    places = {tuple(row) for row in rows if len(row) == runs}
    return len(places) == 1


def look_at_compare(page: Any, url: str, experiment: str, runs: list[Any], out: Path, checks: Checks) -> None:
    """Two runs of different methods, as a researcher compares them (the artifact list of
    MLflow's compare page needs about 900 pixels per run beside it)."""
    newest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        newest.setdefault(run.data.tags.get("method"), run)
    runs = list(newest.values())[:2]
    ids = ",".join(f'"{run.info.run_id}"' for run in runs)
    page.set_viewport_size(WIDE)
    text = _open(page, f'{url}/#/compare-runs?runs=[{ids}]&experiments=["{experiment}"]',
                 out / "mlflow_compare.png", wait_ms=8000)
    no_alpha = [run for run in runs if run.data.params.get("recipe.alpha") == "none"]
    if no_alpha and len(runs) > len(no_alpha):
        # A run without a numeric parameter is drawn at the top of its axis + 0.01 (ft at 1.01).
        checks.that("none" in text and "1.01000" not in text, "ft is drawn apart from the alphas, not at 1.01")
    listed = page.get_by_text("metric_curves.png", exact=True)
    width = listed.first.evaluate("e => e.closest('ul') ? e.closest('ul').getBoundingClientRect().width : 0") \
        if listed.count() else 0
    checks.that(width > 50, f"the compare page's artifact list is visible ({width:.0f} px wide)")
    aligned = _columns_aligned(page, len(runs))
    page.screenshot(path=str(out / "mlflow_compare_scrolled.png"))
    checks.that(aligned, "the compare tables' columns stay aligned on scroll")
    page.mouse.wheel(0, -5000)
    listed.first.click(force=True) if listed.count() else None
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "mlflow_compare_artifacts.png"), full_page=True)


def look_at_viz(page: Any, url: str, out: Path, checks: Checks) -> None:
    page.set_viewport_size(WIDE)
    text = _open(page, f"{url}/", out / "kedro_viz_default.png", wait_ms=8000)
    checks.that("pretrain_clip" in text, "kedro-viz draws the default pipeline")
    # The README's link: kedro-viz draws a namespace (a benchmark's tasks) collapsed unless asked.
    text = _open(page, f"{url}/?pid=digits_mst&expandAllPipelines=true", out / "kedro_viz_digits_mst.png",
                 wait_ms=8000)
    checks.that("digits_mst" in text and "fine_tune" in text, "the README's kedro-viz link shows the per-task nodes")
    # kedro-viz's tag filter lists the whole project's tags in every pipeline (its API sends one
    # registry-wide list: kedro_viz/api/rest/responses/pipelines.py, get_pipeline_response), and
    # a dataset or parameter shared by pipelines is one node carrying the tags of every node
    # that reads or writes it, in any pipeline (kedro_viz/data_access/managers.py, tags.update).
    # What the project controls: a pipeline's own nodes carry no other benchmark's tag.
    foreign = _foreign_tags(url, "digits_mst")
    checks.that(not foreign, f"digits_mst's task nodes carry only their own benchmark's tag {sorted(foreign) or ''}")
    _open(page, f"{url}/?pid=digits_ost", out / "kedro_viz_digits_ost.png", wait_ms=8000)
    heights = [_top(page, layer) for layer in LAYERS]
    drawn = [h for h in heights if h is not None]
    checks.that(len(drawn) >= 3 and drawn == sorted(drawn), f"digits_ost's layers run down as the data flows {heights}")


def look_at_run_in_viz(page: Any, url: str, pipeline: str, out: Path, checks: Checks) -> None:
    """``kedro viz run --pipeline PIPELINE``. kedro-viz 12.5's workflow view draws the last
    `kedro run` on the default pipeline only (its pipeline list is disabled there) and draws a node
    with no recorded event "Skipped", and its tag filter lists every registered pipeline's tags:
    started on the benchmark that ran, the workflow shows that run alone and the filter its tags."""
    text = _open(page, f"{url}/workflow", out / "kedro_viz_workflow.png", wait_ms=8000)
    skipped = text.count("Skipped")
    checks.that("Run execution completed successfully" in text and not skipped,
                f"`kedro viz run --pipeline {pipeline}`: the workflow shows the run completed, no node "
                f"skipped ({skipped} drawn Skipped)")
    graph = _api(url, "main")
    listed = {tag["id"] for tag in graph["tags"]}
    own = {tag for node in graph["nodes"] if node.get("type") == "task" for tag in node.get("tags") or ()}
    checks.that(listed == own, f"`kedro viz run --pipeline {pipeline}`: the tag filter lists its own tags only "
                               f"{sorted(listed - own) or ''}")


def _api(url: str, path: str) -> dict[str, Any]:
    import json

    with urllib.request.urlopen(f"{url}/api/{path}", timeout=60) as answer:
        return json.load(answer)


def _foreign_tags(url: str, pipeline: str) -> set[str]:
    """The tags of ``pipeline``'s task nodes that name another benchmark."""
    from clip_continual.runtime.benchmarks import BENCHMARKS

    graph = _api(url, f"pipelines/{pipeline}")
    tags = {tag for node in graph["nodes"] if node.get("type") == "task" for tag in node.get("tags") or ()}
    return tags & (set(BENCHMARKS) - {pipeline})


def _top(page: Any, text: str) -> float | None:
    """Where ``text`` is drawn, from the top (None when it is not)."""
    found = page.get_by_text(text, exact=True)
    box = found.first.bounding_box() if found.count() else None
    return box["y"] if box else None


def look(project: Path, out: Path) -> list[str]:
    """Start both UIs on ``project``, look at them, save screenshots in ``out``; the failed checks."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    _, runs = _runs(project)
    benchmark = max(runs, key=lambda run: run.info.start_time).data.tags.get("benchmark", "__default__")
    with servers(project, out / "logs", benchmark) as urls, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            look_at_mlflow(page, urls["mlflow"], project, out, checks)
            look_at_viz(page, urls["viz"], out, checks)
            look_at_run_in_viz(page, urls["viz_run"], benchmark, out, checks)
        finally:
            browser.close()
    return checks.failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    project = args.project.resolve()
    reason = why_not_runnable()
    if reason:
        raise SystemExit(f"cannot look at the views: {reason}")
    failed = look(project, args.out or project / "data" / "08_reporting" / "views")
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
