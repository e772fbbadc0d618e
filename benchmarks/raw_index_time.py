"""Time to index COCO 2014 from its raw files, and to decode COCO-sized crops one by one.

Writes synthetic files with the real counts (``--scale 1``: 82,783 / 40,504 images, 604,907 /
291,875 boxes with 24-point polygons, a 123,287-image Karpathy file with five captions each) into
a temporary folder, then times ``coco_crops`` (all three splits, JSON parsing included) and the
single-process decode rate of ``open_image`` on 640 x 480 JPEGs with a box crop.

    python benchmarks/raw_index_time.py --scale 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clip_continual.data.coco import coco_crops
from clip_continual.data.images import open_image
from clip_continual.data.index import ImageIndex

COUNTS = {"train2014": (82_783, 604_907), "val2014": (40_504, 291_875)}
KARPATHY = {"val": 5_000, "test": 5_000}


def _instances(folder: str, images: int, boxes: int, categories: list[dict], rng: np.random.Generator) -> dict:
    ids = np.arange(images) * 3 + 9
    image_of = rng.integers(0, images, size=boxes)
    xywh = np.round(rng.uniform([0, 0, 1, 1], [500, 380, 140, 100], size=(boxes, 4)), 2).tolist()
    polygon = np.round(rng.uniform(0, 400, size=48), 2).tolist()  # shared: size, not content, matters
    cids = [c["id"] for c in categories]
    return {
        "images": [{"id": int(i), "file_name": f"COCO_{folder}_{i:012d}.jpg", "width": 640, "height": 480}
                   for i in ids],
        "annotations": [{"id": n, "image_id": int(ids[image_of[n]]), "bbox": xywh[n], "area": 1.0,
                         "iscrowd": 0, "segmentation": [polygon], "category_id": cids[n % 80]}
                        for n in range(boxes)],
        "categories": categories,
    }


def _karpathy_entry(folder: str, n: int, split: str) -> dict:
    captions = [f"a caption number {k} of image {n} with a few more words" for k in range(5)]
    return {"filepath": folder, "filename": f"COCO_{folder}_{n * 3 + 9:012d}.jpg", "split": split,
            "sentences": [{"raw": caption, "tokens": caption.split()} for caption in captions]}


def _karpathy(train_images: int, val_images: int, scale: float) -> dict:
    entries = [_karpathy_entry("train2014", n, "train") for n in range(train_images)]
    val_end, test_end = KARPATHY["val"] * scale, (KARPATHY["val"] + KARPATHY["test"]) * scale
    for n in range(val_images):
        entries.append(_karpathy_entry("val2014", n, "val" if n < val_end else "test" if n < test_end else "restval"))
    return {"images": entries, "dataset": "coco"}


def write_coco(root: Path, scale: float) -> None:
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    categories = [{"supercategory": "thing", "id": cid, "name": f"class {cid}"}
                  for cid in sorted(rng.choice(np.arange(1, 91), 80, replace=False).tolist())]
    for folder, (images, boxes) in COUNTS.items():
        (root / folder).mkdir()
        document = _instances(folder, int(images * scale), int(boxes * scale), categories, rng)
        for image in document["images"]:  # empty files: indexing only checks that they exist
            (root / folder / image["file_name"]).touch()
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(document))
    train_images, val_images = (int(COUNTS[folder][0] * scale) for folder in COUNTS)
    (root / "dataset_coco.json").write_text(json.dumps(_karpathy(train_images, val_images, scale)))


def decode_rate(folder: Path, count: int) -> float:
    rng = np.random.default_rng(1)
    for n in range(8):
        pixels = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((160, 120)).resize((640, 480)).save(folder / f"{n}.jpg", quality=90)
    index = ImageIndex(str(folder), tuple(f"{n % 8}.jpg" for n in range(count)), np.full(count, -1), (),
                       boxes=np.tile([[100.0, 80.0, 200.0, 150.0]], (count, 1)))
    start = time.perf_counter()
    for i in range(count):
        open_image(index, i)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real counts")
    parser.add_argument("--decodes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "coco2014"
        write_coco(root, args.scale)
        sizes = {p.name: p.stat().st_size / 2**20 for p in sorted(root.rglob("*.json"))}
        start, cpu_start = time.perf_counter(), time.process_time()
        splits = coco_crops(root)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        print("files (MiB): " + ", ".join(f"{name} {size:.0f}" for name, size in sizes.items()))
        print(f"coco_crops: {elapsed:.1f} s wall, {cpu:.1f} s CPU for "
              + ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
        print(f"open_image (640x480 JPEG, one crop, 1 process): {decode_rate(Path(folder), args.decodes):.0f} images/s")


if __name__ == "__main__":
    main()
