"""Evaluation throughput of an MTIL-shaped step: images per second and class-text cost.

MTIL evaluates 11 test sets after each of 11 tasks. This script writes ``--images`` synthetic
JPEGs (``--image-size``), prepares them once as WebDataset shards, and times what one evaluation
step does per test set, on ``--device``:

- image features: the prepared split decoded by DataLoader workers (``--workers``) with the
  model's test transform, encoded in batches of ``--batch-size`` under inference mode (mixed
  precision on CUDA), as ``evaluation.zero_shot.zero_shot_accuracy`` does;
- class-text features: ``--classes`` classes x ``--templates`` templates (Caltech101 in ZSCL:
  101 x 34), first with the tokenizer's cost (the first step) and then with the tokens cached
  (every later step).

    python benchmarks/eval_throughput.py --model ViT-B-16 --images 2048 --workers 0 4 8 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_continual.data.loading import LoaderConfig
from clip_continual.data.shards import PreparedSplit, prepare_split
from clip_continual.data.source import SubsetSource
from clip_continual.evaluation.features import image_features
from clip_continual.evaluation.zero_shot import zero_shot_classifier
from clip_continual.model.clip import ModelSpec
from clip_continual.model.sources import build_model


@dataclass
class _Pictures:
    """Random pictures as an indexable (image, label) dataset."""

    images: list[Image.Image]
    root: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.images[i], i % 10


def prepared_test_set(folder: Path, count: int, size: int) -> PreparedSplit:
    rng = np.random.default_rng(0)
    pictures = _Pictures([Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
                          .resize((size, size), Image.Resampling.BILINEAR) for _ in range(count)])
    source = SubsetSource("synthetic_test", pictures, np.arange(count), np.arange(count) % 10,
                          tuple(f"class {k}" for k in range(10)), ("a photo of a {}.",))
    prepare_split(source, folder / "synthetic_test")
    return PreparedSplit(folder / "synthetic_test")


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def image_rate(clip, test_set, batch_size: int, workers: int, device: torch.device, repeats: int) -> float:
    loader = LoaderConfig(num_workers=workers, persistent_workers=False)
    image_features(clip, test_set, batch_size, device, loader)  # warm-up (and cuDNN autotuning)
    synchronise(device)
    started = time.perf_counter()
    for _ in range(repeats):
        image_features(clip, test_set, batch_size, device, loader)
    synchronise(device)
    return repeats * len(test_set) / (time.perf_counter() - started)


def text_seconds(clip, classes: int, templates: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Seconds for one dataset's class features: tokenizing included, then with cached tokens."""
    names = [f"object number {k}" for k in range(classes)]
    patterns = [f"a photo of a {{}}, example {t}." for t in range(templates)]
    times = []
    for _ in range(2):
        synchronise(device)
        started = time.perf_counter()
        zero_shot_classifier(clip, names, patterns, batch_size, device)
        synchronise(device)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clip-continual-micro")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--templates", type=int, default=34)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = build_model(ModelSpec(args.model), device=device)  # random weights: the speed is the same
    print(f"model {args.model} at {clip.image_size} px on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    first, cached = text_seconds(clip, args.classes, args.templates, args.batch_size, device)
    print(f"class-text features, {args.classes} classes x {args.templates} templates: "
          f"{first:.2f} s first (tokenizing), {cached:.2f} s with cached tokens")
    with tempfile.TemporaryDirectory() as folder:
        test_set = prepared_test_set(Path(folder), args.images, args.image_size)
        for workers in args.workers:
            rate = image_rate(clip, test_set, args.batch_size, workers, device, args.repeats)
            print(f"image features, {args.images} images of {args.image_size} px from shards, "
                  f"batch {args.batch_size}, {workers} workers: {rate:.0f} images/s")


if __name__ == "__main__":
    main()
