"""How fast `kedro data check` and shard preparation are.

``--pipeline NAME`` times the check of a benchmark on the data in this project (as `kedro data
check --pipeline NAME` runs it). Without it, a synthetic EuroSAT RGB at its real size (27,000
files in 10 class folders, empty files: the check never decodes) is checked, and preparation's
images/s per core is measured on ``--images`` 500 x 375 JPEGs in one process.

    python benchmarks/data_check.py
    python benchmarks/data_check.py --pipeline mtil_order1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clip_continual.data import check
from clip_continual.data.index import ImageIndex
from clip_continual.data.shards import ShardSettings, prepare_split

EUROSAT = {"AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500, "Industrial": 2500,
           "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000, "River": 2500, "SeaLake": 3000}


def time_project_check(pipeline: str) -> None:
    from clip_continual.runtime.data_commands import check_lines, project_parameters

    started = time.perf_counter()
    lines = check_lines(pipeline, project_parameters(Path.cwd()), Path.cwd())
    print("\n".join(map(str, lines)))
    print(f"data check of {pipeline}: {time.perf_counter() - started:.2f} s")


def time_synthetic_check(folder: Path) -> None:
    for name, count in EUROSAT.items():
        (folder / name).mkdir(parents=True)
        for n in range(1, count + 1):
            (folder / name / f"{name}_{n}.jpg").touch()
    started = time.perf_counter()
    line = check.check_dataset(check.needs(["eurosat_train", "eurosat_test"], {"eurosat_root": str(folder)})[0])
    print(line)
    print(f"data check of a 27,000-file EuroSAT: {time.perf_counter() - started:.2f} s")


def time_preparation(folder: Path, images: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for n in range(images):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / f"{n}.jpg", quality=90)
    index = ImageIndex(root=str(folder), paths=tuple(f"{n}.jpg" for n in range(images)),
                       labels=np.zeros(images), class_names=("a",), name="bench")
    started = time.perf_counter()
    prepare_split(index, folder.parent / "prepared", ShardSettings(max_side=256, num_workers=0))
    seconds = time.perf_counter() - started
    print(f"preparation: {images / seconds:.0f} images/s on one core ({images} JPEGs of 500 x 375 -> 256 px)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    if args.pipeline:
        time_project_check(args.pipeline)
        return
    with tempfile.TemporaryDirectory() as tmp:
        time_synthetic_check(Path(tmp) / "2750")
        time_preparation(Path(tmp) / "raw", args.images)


if __name__ == "__main__":
    main()
