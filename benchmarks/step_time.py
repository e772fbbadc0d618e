"""Median training-step time of each method on random data, all in one process.

Prints each method's median step time (wall clock and this process's CPU time), its ratio to
ft's, its trainable parameters and its per-task setup. By default every registered method runs.

Every method runs through the real loop (``training.loop.fine_tune``); step times are taken between
consecutive ``on_step`` calls after a warm-up. ``--reference`` adds the straightforward VR-LwF
computation (no caching, full-context text, separate forwards) for comparison.

Methods that replay or regularise towards earlier tasks are timed as in a later task: a random
reference set of image-caption pairs is given (A-GEM, GEM, ZSCL, whose zero-shot model is the
start model), EWC gets a Fisher for every parameter, GEM a memory of one earlier task (two
constraints); iCaRL builds its memory from the task's own images, as in every task.

    python benchmarks/step_time.py --steps 20 --batch-size 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.methods import METHODS, method_class
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.methods.vr_lwf import VocabularyReplayLwF, reference_vr_lwf_terms
from clip_continual.model.clip import ModelSpec
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=500, help="training-set size")
    parser.add_argument("--architecture", default="clip-continual-tiny-p8")  # the embedded default
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated (default: every registered method); add 'reference' "
                             "for the straightforward VR-LwF")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 keeps timings stable on a shared CPU")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat all methods round-robin, so load changes hit every method alike")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = build_model(ModelSpec(args.architecture))
    size = start.image_size
    rng = np.random.default_rng(0)
    train_set = ImageSet(
        images=rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, args.classes, args.images),
        class_names=tuple(f"class {i}" for i in range(args.classes)),
    )
    prompts = [f"this is a photo of {name} ." for name in train_set.class_names]
    reference_set = ImageSet(
        images=rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8),
        labels=np.zeros(args.images, np.int64), class_names=("pair",),
        captions=np.array([[f"a picture of thing number {i}"] for i in range(args.images)]),
    )
    vocabularies = {
        mode: build_vocabulary(VocabularyConfig(mode=mode), start.context_length)
        for mode in ("paper", "fixed")
    }

    names = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    # Wall time is what a run costs; CPU time of this process is steadier on a shared machine.
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    setups: dict[str, list[float]] = {name: [] for name in names}
    trainable: dict[str, int] = {}
    for _ in range(args.rounds):
        for name in names:
            method = ReferenceVRLwF() if name == "reference" else None
            method_name = "vr_lwf" if name == "reference" else name
            config = TrainingConfig(method=method_name, steps=args.warmup + args.steps, epochs=None,
                                    batch_size=args.batch_size, lr=1e-5, device=args.device,
                                    progress=False, log_every=10**9)
            mode = method_class(method_name).default_vocabulary_mode
            vocabulary = vocabularies["fixed" if mode == "fixed" else "paper"]
            stamps = [(time.perf_counter(), time.process_time())]
            _, summary = fine_tune(
                start, train_set, prompts, config=config, vocabulary=vocabulary, method=method,
                extras={"reference_set": reference_set, "pretrained_model": start},
                previous_state=later_task_state(method_name, start, train_set),
                on_step=lambda step, values: stamps.append((time.perf_counter(), time.process_time())),
            )
            # Deltas between consecutive steps; the first also holds the per-task setup.
            deltas = np.diff(np.asarray(stamps), axis=0)[max(1, args.warmup) :]
            wall[name] += deltas[:, 0].tolist()
            cpu[name] += deltas[:, 1].tolist()
            setups[name].append(summary["setup_time_s"])
            trainable[name] = summary["trainable_parameters"]

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
