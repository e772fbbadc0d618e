"""Images per second of the training data loader, next to the model's training-step time.

Writes COCO-like synthetic JPEGs (``--image-size`` full images with one object box each) into a
temporary folder, prepares them once as WebDataset shards (shorter side <= 256), then times the
DataLoader feeding the paper's train transform (resize 256 bicubic, random crop, flip) at the
model's resolution, for each worker count, from two sources:

- ``raw``: every step decodes the full JPEG and cuts the crop out (what preparing avoids);
- ``shards``: the prepared split (one positional read and a small JPEG per image).

Then it times ``--steps`` training steps of the model (ft, whole model, in-memory batches) and
prints both, so one sees whether the loader keeps up with the model on this machine.

    python benchmarks/loader_throughput.py --images 400 --workers 1 2 4 --model ViT-B-32 --batch-size 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_continual.data.common import ImageSet
from clip_continual.data.index import ImageIndex
from clip_continual.data.loading import LoaderConfig, StreamedImages, as_lazy
from clip_continual.data.shards import PreparedSplit, ShardSettings, prepare_split
from clip_continual.model.clip import ModelSpec
from clip_continual.model.sources import build_model
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> ImageIndex:
    rng = np.random.default_rng(seed)
    paths, boxes = [], []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
        width, height = rng.integers(size[0] // 4, size[0] // 2), rng.integers(size[1] // 4, size[1] // 2)
        boxes.append([rng.integers(0, size[0] - width), rng.integers(0, size[1] - height), width, height])
        paths.append(f"{i:06d}.jpg")
    return ImageIndex(str(folder), tuple(paths), np.arange(count) % 10, tuple(f"class {k}" for k in range(10)),
                      boxes=np.asarray(boxes, dtype=np.float32), name="synthetic")


def loader_rate(images, clip, workers: int, batch_size: int, epochs: int) -> float:
    """Images per second over ``epochs`` passes (after the workers have started)."""
    source = StreamedImages(as_lazy(images), LoaderConfig(num_workers=workers, persistent_workers=False))
    order = np.random.default_rng(0).permutation(len(images))
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)] * epochs
    iterator = source.train_batches(clip, batches, torch.device("cpu"), augment=True, need_clean=False)
    next(iterator)  # worker start-up is paid once per task, not per image
    started, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch.indices)
    return seen / (time.perf_counter() - started)


def step_time(clip, batch_size: int, steps: int) -> float:
    size = clip.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    data = ImageSet(images, np.arange(batch_size) % 10, tuple(f"class {k}" for k in range(10)))
    config = TrainingConfig(method="ft", steps=steps + 1, epochs=None, batch_size=batch_size, lr=1e-6,
                            progress=False, seed=0)
    times = []
    fine_tune(clip, data, [f"a photo of {n}" for n in data.class_names], config=config,
              on_step=lambda step, values: times.append(time.perf_counter()))
    return float(np.median(np.diff(times)))  # the first step (warm-up) is left out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = build_model(ModelSpec(args.model))
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw"
        raw.mkdir()
        index = write_images(raw, args.images, tuple(args.image_size))
        started = time.perf_counter()
        prepare_split(index, Path(folder) / "prepared", ShardSettings(num_workers=max(args.workers)))
        print(f"prepare once ({max(args.workers)} workers): {args.images / (time.perf_counter() - started):.0f} images/s")
        prepared = PreparedSplit(Path(folder) / "prepared")
        print(f"loader, train transform at {clip.image_size} px, batch {args.batch_size} (images/s):")
        for workers in args.workers:
            rates = [loader_rate(source, clip, workers, args.batch_size, args.epochs) for source in (index, prepared)]
            print(f"  {workers} worker(s): raw JPEG + crop {rates[0]:7.0f}   prepared shards {rates[1]:7.0f}")
    seconds = step_time(clip, args.batch_size, args.steps)
    print(f"model step ({args.model}, ft, batch {args.batch_size}, {torch.get_num_threads()} threads): "
          f"{seconds:.3f} s = {args.batch_size / seconds:.0f} images/s")


if __name__ == "__main__":
    main()
