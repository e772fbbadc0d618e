"""Data-parallel scaling of one task's fine-tuning: step time and images/s for 1, 2, ... N workers.

Trains ``vr_lwf`` for a few steps on random images (no download: the model is randomly
initialised) with the same global batch for every worker count, through the training node's
own code path (``clip_continual.training.distributed``), and reports rank 0's median step time,
images/s and the scaling efficiency ``(images/s with N) / (N * images/s with 1)``.

    python benchmarks/scaling.py --workers 1,2                      # CPU, micro model
    python benchmarks/scaling.py --model ViT-B-16 --batch-size 256 --workers 1,2,4,8 --device cuda
    python benchmarks/scaling.py --backend ray --address auto --model ViT-B-16 --batch-size 256 --workers 1,8,16 --device cuda
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.model.clip import ModelSpec
from clip_continual.model.sources import build_model
from clip_continual.training.config import TrainingConfig
from clip_continual.training.distributed import fine_tune_distributed


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clip-continual-micro", help="open_clip architecture")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--backend", default="torch", choices=("torch", "ray"))
    parser.add_argument("--address", default=None, help="Ray cluster address (ray backend)")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--steps", type=int, default=8, help="steps per run; the median step time is reported")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    return parser.parse_args()


def _task(model, batch_size: int, device: str, steps: int) -> dict:
    rng = np.random.default_rng(0)
    size, classes = model.image_size, 10
    images = ImageSet(images=rng.integers(0, 256, (2 * batch_size, size, size, 3), dtype=np.uint8),
                      labels=np.arange(2 * batch_size) % classes,
                      class_names=tuple(f"class {i}" for i in range(classes)))
    return dict(
        train_set=images, class_prompts=[f"a photo of {n} ." for n in images.class_names],
        vocabulary=build_vocabulary(VocabularyConfig(mode="paper"), model.context_length),
        config=TrainingConfig(method="vr_lwf", steps=steps, epochs=None, batch_size=batch_size,
                              device=device, progress=False, lr=1e-5),
    )


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model = build_model(ModelSpec(args.model))
    task = _task(model, args.batch_size, args.device, args.steps)
    print(f"{args.model}, global batch {args.batch_size}, {args.steps} steps, backend {args.backend}, "
          f"device {args.device}, {torch.get_num_threads()} CPU threads per process")
    print(f"{'workers':>7} {'step time (s)':>14} {'images/s':>10} {'efficiency':>10}")
    single = None
    for workers in [int(w) for w in args.workers.split(",")]:
        settings = {"backend": args.backend, "workers": workers}
        if args.backend == "ray":
            settings.update(address=args.address, use_gpu=args.device != "cpu")
        _, summary = fine_tune_distributed(settings, model, teacher=model, **task)
        step = summary["median_step_time_s"]
        throughput = args.batch_size / step
        single = single or throughput / workers
        print(f"{workers:>7} {step:>14.4f} {throughput:>10.1f} {throughput / (workers * single):>10.2f}")


if __name__ == "__main__":
    main()
