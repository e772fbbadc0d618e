"""One speed check of a GPU machine: training, evaluation, the data loader, a ``kedro run``, and
what MTIL order I would take. Needs no download: random weights and synthetic images.

Stages (``--stages``, all by default):

- ``training``: images/s and peak memory of ft and vr_lwf training steps (batch 64, ViT-B-16 at
  224 px) through the real loop, without a speed switch and with each alone (``step_time.py``);
- ``evaluation``: images/s of the image features of a prepared test split (``eval_throughput.py``);
- ``loader``: images/s of the training DataLoader from prepared shards (``loader_throughput.py``);
- ``kedro_run``: the embedded default pipeline, 50 pretraining steps and 50 steps per task,
  through the Kedro session
  ``kedro run`` starts, in a temporary project (its wall time);
- the extrapolated time of MTIL order I: 11 tasks x 1,000 steps at the measured step time, plus 11
  evaluations of ``--mtil-test-images`` images at the measured evaluation rate.

It writes everything to one JSON file (``--out``) and prints a table. ``--scale small`` runs the
same code on CPU in seconds (micro model, a few steps, the tracing compile backend), which the
test suite does so that this script keeps working.

    bash benchmarks/gpu_check.sh                 # the full check, under 8 minutes on one GPU
    bash benchmarks/gpu_check.sh --scale small   # the same paths on CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts

import eval_throughput  # noqa: E402
import loader_throughput  # noqa: E402
import step_time  # noqa: E402

from clip_continual.data.shards import PreparedSplit, ShardSettings, prepare_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("training", "evaluation", "loader", "kedro_run")
MTIL_TASKS, MTIL_STEPS = 11, 1000  # ZSCL's MTIL order I: 11 datasets, 1,000 iterations each


@dataclass(frozen=True)
class Scale:
    architecture: str
    device: str
    batch_size: int
    steps: int
    warmup: int
    train_images: int
    compile_backend: str
    eval_images: int
    eval_batch_size: int
    workers: int
    loader_images: int
    loader_image_size: tuple[int, int]
    kedro_parameters: dict
    threads: int = 0  # torch threads; 0: torch's default


SCALES = {
    "full": Scale("ViT-B-16", "cuda", 64, 20, 5, 512, "inductor", 4096, 256, 8, 1024, (500, 375), {
        "continual_learning": {"training": {"steps": 50, "batch_size": 64, "progress": False}},
        "pretraining": {"steps": 50, "progress": False},
    }),
    # The same code in seconds on CPU: the micro model, a couple of steps, compile only traced.
    "small": Scale("clip-continual-micro", "cpu", 8, 2, 1, 16, "eager", 16, 8, 0, 16, (64, 48), {
        "model": {"architecture": "clip-continual-micro"},
        "continual_learning": {"training": {"steps": 2, "batch_size": 16, "progress": False}},
        "pretraining": {"steps": 3, "batch_size": 32, "progress": False},
    }, threads=1),
}


def training_stage(scale: Scale, switches: list[str]) -> list[dict[str, Any]]:
    """One row per (method, switch): ms/step, images/s, peak memory, ratio to the baseline."""
    work = step_time.make_workload(scale.architecture, scale.train_images, 10, scale.device)
    rows = []
    for method in ("ft", "vr_lwf"):
        for switch, settings in step_time.switch_settings(switches).items():
            timing = step_time.time_steps(work, method, scale.steps, scale.warmup, scale.batch_size, scale.device,
                                          compile_backend=scale.compile_backend, **settings)
            seconds = statistics.median(timing.wall)
            rows.append({"method": method, "switch": switch, "ms_per_step": 1000 * seconds,
                         "images_per_s": scale.batch_size / seconds,
                         "peak_memory_mib": timing.summary["peak_memory_mib"]})
    for row in rows:
        baseline = next(r for r in rows if r["method"] == row["method"] and r["switch"] == "baseline")
        row["ratio"] = row["ms_per_step"] / baseline["ms_per_step"]
    return rows


def evaluation_stage(scale: Scale, folder: Path) -> dict[str, Any]:
    clip = step_time.build_model(step_time.ModelSpec(scale.architecture), device=torch.device(scale.device))
    test_set = eval_throughput.prepared_test_set(folder, scale.eval_images, 256 if scale.device == "cuda" else 32)
    rate = eval_throughput.image_rate(clip, test_set, scale.eval_batch_size, scale.workers,
                                      torch.device(scale.device), repeats=2)
    return {"images_per_s": rate, "batch_size": scale.eval_batch_size, "workers": scale.workers}


def loader_stage(scale: Scale, folder: Path) -> dict[str, Any]:
    (folder / "raw").mkdir()
    index = loader_throughput.write_images(folder / "raw", scale.loader_images, scale.loader_image_size)
    prepare_split(index, folder / "prepared", ShardSettings(num_workers=scale.workers))
    clip = step_time.build_model(step_time.ModelSpec(scale.architecture))
    rate = loader_throughput.loader_rate(PreparedSplit(folder / "prepared"), clip, scale.workers,
                                         scale.batch_size, epochs=2)
    return {"images_per_s": rate, "workers": scale.workers, "batch_size": scale.batch_size}


def kedro_run_stage(scale: Scale, folder: Path) -> dict[str, Any]:
    """The embedded default pipeline through the session ``kedro run`` opens, in a temporary
    project (this repository's conf/, local parameters, a tracking store of its own)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.runner import SequentialRunner

    project = folder / "project"
    shutil.copytree(REPO_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    shutil.copy2(REPO_ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "src").mkdir()
    local = project / "conf" / "local"
    local.mkdir()
    (local / "parameters.yml").write_text(yaml.safe_dump(scale.kedro_parameters))
    (local / "mlflow.yml").write_text(yaml.safe_dump(
        {"server": {"mlflow_tracking_uri": f"sqlite:///{project / 'mlflow.db'}"}}))
    previous = Path.cwd()
    os.chdir(project)
    started = time.perf_counter()
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project) as session:
            session.run(runner=SequentialRunner())
    finally:
        os.chdir(previous)
    return {"wall_s": time.perf_counter() - started, "parameters": scale.kedro_parameters}


def mtil_estimate(training: list[dict[str, Any]], evaluation: dict[str, Any] | None,
                  test_images: int) -> dict[str, Any]:
    """Hours of MTIL order I per method: its baseline and its fastest switch."""
    estimate: dict[str, Any] = {"tasks": MTIL_TASKS, "steps_per_task": MTIL_STEPS, "test_images": test_images}
    eval_s = MTIL_TASKS * test_images / evaluation["images_per_s"] if evaluation else 0.0
    estimate["evaluation_h"] = eval_s / 3600
    for method in sorted({row["method"] for row in training}):
        rows = [row for row in training if row["method"] == method]
        for label, row in (("baseline", rows[0]), ("fastest", min(rows, key=lambda r: r["ms_per_step"]))):
            train_s = MTIL_TASKS * MTIL_STEPS * row["ms_per_step"] / 1000
            estimate[f"{method}_{label}"] = {"switch": row["switch"], "training_h": train_s / 3600,
                                             "total_h": (train_s + eval_s) / 3600}
    return estimate


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['scale']['architecture']} on {report['device']}, batch {report['scale']['batch_size']}")
    if report.get("training"):
        print(f"  {'method':<8} {'switch':<26} {'ms/step':>9} {'x base':>7} {'images/s':>9} {'peak MiB':>9}")
    for row in report.get("training", []):
        print(f"  {row['method']:<8} {row['switch']:<26} {row['ms_per_step']:9.1f} {row['ratio']:6.2f}x "
              f"{row['images_per_s']:9.0f} {row['peak_memory_mib']:9.0f}")
    for stage in ("evaluation", "loader"):
        if stage in report:
            print(f"  {stage}: {report[stage]['images_per_s']:.0f} images/s")
    if "kedro_run" in report:
        print(f"  kedro run (embedded default): {report['kedro_run']['wall_s']:.1f} s")
    for key, value in report.get("mtil_order1", {}).items():
        if isinstance(value, dict):
            print(f"  MTIL order I, {key} ({value['switch']}): {value['total_h']:.2f} h "
                  f"({value['training_h']:.2f} h training)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default=os.environ.get("GPU_CHECK_SCALE", "full"))
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated of {', '.join(STAGES)}")
    parser.add_argument("--switches", default="tf32,compile,channels_last,foreach,activation_checkpointing")
    # A round upper figure for MTIL's 11 test sets together; give your prepared splits' total.
    parser.add_argument("--mtil-test-images", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    scale, stages = SCALES[args.scale], [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("the full check needs a CUDA GPU; --scale small runs on CPU")
    if scale.threads:
        torch.set_num_threads(scale.threads)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if scale.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    report: dict[str, Any] = {"scale": {"name": args.scale, **asdict(scale)}, "device": device}
    with tempfile.TemporaryDirectory() as folder:
        for stage in stages:
            started, where = time.perf_counter(), Path(folder) / stage
            where.mkdir()
            report[stage] = (training_stage(scale, [s for s in args.switches.split(",") if s])
                             if stage == "training" else globals()[f"{stage}_stage"](scale, where))
            report.setdefault("stage_seconds", {})[stage] = time.perf_counter() - started
    if "training" in report:
        report["mtil_order1"] = mtil_estimate(report["training"], report.get("evaluation"), args.mtil_test_images)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
