"""Median training-step time of each method on random data, all in one process.

Prints each method's median step time (wall clock and this process's CPU time), its ratio to
ft's, its trainable parameters and its per-task setup. By default every registered method runs.

``--switches`` times ft and vr_lwf (or ``--methods``) without any speed switch and with each
switch of ``SWITCHES`` alone, and prints each one's step time as a ratio to the baseline's.

Every method runs through the real loop (``training.loop.fine_tune``); step times are taken between
consecutive ``on_step`` calls after a warm-up. ``--reference`` adds the straightforward VR-LwF
computation (no caching, full-context text, separate forwards) for comparison.

Methods that replay or regularise towards earlier tasks are timed as in a later task: a random
reference set of image-caption pairs is given (A-GEM, GEM, ZSCL, whose zero-shot model is the
start model), EWC gets a Fisher for every parameter, GEM a memory of one earlier task (two
constraints); iCaRL builds its memory from the task's own images, as in every task.

    python benchmarks/step_time.py --steps 20 --batch-size 100
    python benchmarks/step_time.py --switches tf32,compile,channels_last,foreach --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.methods import METHODS, method_class
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.methods.vr_lwf import VocabularyReplayLwF, reference_vr_lwf_terms
from clip_continual.model.clip import ClipModel, ModelSpec
from clip_continual.model.sources import build_model
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune


class ReferenceVRLwF(VocabularyReplayLwF):
    """VR-LwF computed the straightforward way, for timing only."""

    name = "vr_lwf_reference"
    uses_teacher_images = False  # recomputes the teacher's image features every step

    def before_task(self, task):
        self._task_teacher = task.teacher.model

    def loss_terms(self, student, batch, task):
        return reference_vr_lwf_terms(
            student, self._task_teacher, batch.pixels, batch.labels, task.class_tokens,
            task.current_classes.tolist(), task.seen_classes.tolist(), batch.vocab_tokens, self.alpha,
        )


def later_task_state(name: str, start, train_set: ImageSet) -> dict[str, np.ndarray]:
    """What an earlier task would have handed on, so the per-step work is that of task >= 2."""
    if name == "ewc":
        return {f"fisher:{n}": np.ones(tuple(p.shape), np.float32) for n, p in start.model.named_parameters()}
    if name == "gem":
        rows = np.arange(min(50, len(train_set)))
        return {"memory_images": train_set.images[rows], "memory_labels": train_set.labels[rows],
                "memory_tasks": np.zeros(len(rows), np.int64)}
    return {}


# Each switch of ``--switches``: the training settings it turns on (README, "Speed switches").
SWITCHES: dict[str, dict[str, object]] = {
    "tf32": {"tf32": True},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "foreach": {"fused": False},  # the multi-tensor Adam against the default fused one
    "activation_checkpointing": {"activation_checkpointing": True},
    "bf16": {"precision": "bf16"},
    "fp32": {"precision": "fp32"},
}


@dataclass
class Timing:
    """One run's step times after the warm-up: wall and this process's CPU seconds."""

    wall: list[float]
    cpu: list[float]
    summary: dict


@dataclass
class Workload:
    """The start model and the random data every timed run trains on."""

    start: ClipModel
    train_set: ImageSet
    prompts: list[str]
    reference_set: ImageSet
    vocabularies: dict[str, object]


def make_workload(architecture: str, images: int, classes: int, device: str = "cpu") -> Workload:
    start = build_model(ModelSpec(architecture), device=torch.device(device))
    size = start.image_size
    rng = np.random.default_rng(0)
    train_set = ImageSet(
        images=rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, classes, images),
        class_names=tuple(f"class {i}" for i in range(classes)),
    )
    reference_set = ImageSet(
        images=rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8),
        labels=np.zeros(images, np.int64), class_names=("pair",),
        captions=np.array([[f"a picture of thing number {i}"] for i in range(images)]),
    )
    vocabularies = {mode: build_vocabulary(VocabularyConfig(mode=mode), start.context_length)
                    for mode in ("paper", "fixed")}
    prompts = [f"this is a photo of {name} ." for name in train_set.class_names]
    return Workload(start, train_set, prompts, reference_set, vocabularies)


def time_steps(work: Workload, name: str, steps: int, warmup: int, batch_size: int, device: str,
               **settings) -> Timing:
    """``steps`` timed steps of method ``name`` ("reference": the straightforward VR-LwF) after
    ``warmup`` untimed ones, through the real loop with the training ``settings`` given."""
    method = ReferenceVRLwF() if name == "reference" else None
    method_name = "vr_lwf" if name == "reference" else name
    config = TrainingConfig(**{"method": method_name, "steps": warmup + steps, "epochs": None,
                               "batch_size": batch_size, "lr": 1e-5, "device": device, "progress": False,
                               "log_every": 10**9, **settings})
    mode = method_class(method_name).default_vocabulary_mode
    stamps = [(time.perf_counter(), time.process_time())]
    _, summary = fine_tune(
        work.start, work.train_set, work.prompts, config=config, method=method,
        vocabulary=work.vocabularies["fixed" if mode == "fixed" else "paper"],
        extras={"reference_set": work.reference_set, "pretrained_model": work.start},
        previous_state=later_task_state(method_name, work.start, work.train_set),
        on_step=lambda step, values: stamps.append((time.perf_counter(), time.process_time())),
    )
    # Deltas between consecutive steps; the first also holds the per-task setup.
    deltas = np.diff(np.asarray(stamps), axis=0)[max(1, warmup):]
    return Timing(deltas[:, 0].tolist(), deltas[:, 1].tolist(), summary)


def switch_settings(names: list[str]) -> dict[str, dict[str, object]]:
    """The runs of ``--switches``: the baseline and each switch alone."""
    unknown = [name for name in names if name not in SWITCHES]
    if unknown:
        raise SystemExit(f"unknown switch(es) {unknown}; choose from {', '.join(SWITCHES)}")
    return {"baseline": {}, **{name: SWITCHES[name] for name in names}}


def print_switches(args, timings: dict[tuple[str, str], list[float]]) -> None:
    print(f"{args.architecture}, batch {args.batch_size}, {args.steps} timed steps x {args.rounds} "
          f"round(s), {args.device}; ratio: the switch's step time over the baseline's")
    print(f"  {'method':<12} {'switch':<26} {'wall ms':>9} {'ratio':>7} {'images/s':>9}")
    for (name, switch), wall in timings.items():
        median, baseline = statistics.median(wall), statistics.median(timings[(name, "baseline")])
        print(f"  {name:<12} {switch:<26} {median * 1000:9.1f} {median / baseline:6.2f}x "
              f"{args.batch_size / median:9.0f}")


def run_switches(args, work: Workload) -> None:
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else ["ft", "vr_lwf"]
    runs = switch_settings([s.strip() for s in args.switches.split(",") if s.strip()])
    timings: dict[tuple[str, str], list[float]] = {(n, s): [] for n in names for s in runs}
    for _ in range(args.rounds):
        for name in names:
            for switch, settings in runs.items():
                timings[(name, switch)] += time_steps(work, name, args.steps, args.warmup, args.batch_size,
                                                      args.device, compile_backend=args.compile_backend,
                                                      **settings).wall
    print_switches(args, timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=500, help="training-set size")
    parser.add_argument("--architecture", default="clip-continual-tiny-p8")  # the embedded default
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: every registered method, with --switches ft,vr_lwf); "
                             "add 'reference' for the straightforward VR-LwF")
    parser.add_argument("--switches", default=None,
                        help=f"comma-separated speed switches of {', '.join(SWITCHES)}: each method runs "
                             f"without any, then with each alone")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile switch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 keeps timings stable on a shared CPU")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat all methods round-robin, so load changes hit every method alike")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = make_workload(args.architecture, args.images, args.classes, args.device)
    if args.switches:
        run_switches(args, work)
    else:
        run_methods(args, work)


def run_methods(args, work: Workload) -> None:
    names = list(dict.fromkeys(m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()))
    # Wall time is what a run costs; CPU time of this process is steadier on a shared machine.
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    setups: dict[str, list[float]] = {name: [] for name in names}
    trainable: dict[str, int] = {}
    for _ in range(args.rounds):
        for name in names:
            timing = time_steps(work, name, args.steps, args.warmup, args.batch_size, args.device)
            wall[name] += timing.wall
            cpu[name] += timing.cpu
            setups[name].append(timing.summary["setup_time_s"])
            trainable[name] = timing.summary["trainable_parameters"]

    print(f"{args.architecture}, batch {args.batch_size}, {args.classes} classes, "
          f"{args.images} images, {args.steps} timed steps x {args.rounds} round(s), "
          f"torch threads {torch.get_num_threads()}")
    print(f"  {'method':<18} {'wall ms':>9} {'ratio':>7} {'cpu ms':>9} {'ratio':>7} {'trainable':>10}"
          f"  per-task setup")
    wall_ft = statistics.median(wall["ft"]) if "ft" in wall else None
    cpu_ft = statistics.median(cpu["ft"]) if "ft" in cpu else None
    for name in names:
        wall_median, cpu_median = statistics.median(wall[name]), statistics.median(cpu[name])
        wall_ratio = f"{wall_median / wall_ft:6.2f}x" if wall_ft else "      -"
        cpu_ratio = f"{cpu_median / cpu_ft:6.2f}x" if cpu_ft else "      -"
        print(f"  {name:<18} {wall_median * 1000:9.1f} {wall_ratio} {cpu_median * 1000:9.1f} {cpu_ratio}"
              f" {trainable[name]:>10,}  {statistics.median(setups[name]) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
