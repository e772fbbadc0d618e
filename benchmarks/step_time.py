"""Median training-step time of each method on random data, all in one process.

Every method runs through the real loop (``training.fine_tune``); step times are taken between
consecutive ``on_step`` calls after a warm-up. ``--reference`` adds the straightforward VR-LwF
computation (no caching, full-context text, separate forwards) for comparison.

    python benchmarks/step_time.py --steps 20 --batch-size 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.methods import VocabularyReplayLwF, reference_vr_lwf_terms
from clip_continual.models import ModelSpec, build_model
from clip_continual.replay import VocabularyConfig, build_vocabulary
from clip_continual.training import TrainingConfig, fine_tune


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=500, help="training-set size")
    parser.add_argument("--architecture", default="clip-continual-tiny")
    parser.add_argument("--methods", default="ft,lwf,vr_lwf,vr_lwf_zscl",
                        help="comma-separated; add 'reference' for the straightforward VR-LwF")
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
    vocabularies = {
        mode: build_vocabulary(VocabularyConfig(mode=mode), start.context_length)
        for mode in ("paper", "fixed")
    }

    names = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    step_times: dict[str, list[float]] = {name: [] for name in names}
    setups: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            method = ReferenceVRLwF() if name == "reference" else None
            method_name = "vr_lwf" if name == "reference" else name
            config = TrainingConfig(method=method_name, steps=args.warmup + args.steps, epochs=None,
                                    batch_size=args.batch_size, lr=1e-5, device=args.device,
                                    progress=False, log_every=10**9)
            vocabulary = vocabularies["fixed" if method_name == "vr_lwf_zscl" else "paper"]
            stamps: list[float] = [time.perf_counter()]
            _, summary = fine_tune(start, train_set, prompts, config=config, vocabulary=vocabulary,
                                   method=method,
                                   on_step=lambda step, values: stamps.append(time.perf_counter()))
            # Deltas between consecutive steps; the first also holds the per-task setup.
            step_times[name] += np.diff(stamps)[max(1, args.warmup) :].tolist()
            setups[name].append(summary["setup_time_s"])
    medians = {name: statistics.median(times) for name, times in step_times.items()}

    print(f"{args.architecture}, batch {args.batch_size}, {args.classes} classes, "
          f"{args.images} images, {args.steps} timed steps x {args.rounds} round(s), "
          f"torch threads {torch.get_num_threads()}")
    base = medians.get("ft")
    for name, median in medians.items():
        ratio = f"{median / base:5.2f}x ft" if base else ""
        print(f"  {name:<18} median step {median * 1000:8.1f} ms  {ratio}  "
              f"(per-task setup {statistics.median(setups[name]) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
