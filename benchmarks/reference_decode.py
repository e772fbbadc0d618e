"""Time to build a named benchmark's reference set: an ImageNet-like image folder of synthetic
JPEGs (``--image-size``, 500 x 375 as a typical ImageNet photo) and a Conceptual Captions TSV are
written to a temporary folder, then indexed, sampled and decoded at ``--resolution`` as the
benchmark's data pipeline does (``clip_continual.data.reference``). Prints ms per image and the
in-memory size, from which the default 10,000 images can be extrapolated.

    python benchmarks/reference_decode.py --images 300 --resolution 224
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clip_continual.data.reference import ReferenceSettings, decode_reference, reference_source


def write_sources(root: Path, images: int, size: tuple[int, int], classes: int = 10) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    folder = root / "imagenet" / "train"
    for i in range(images):
        pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        path = folder / f"n{i % classes:08d}" / f"image_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize(size, Image.BILINEAR).save(path, quality=90)
    captions = root / "Validation_GCC-1.1.0-Validation.tsv"
    captions.write_text("".join(f"caption number {i}\thttps://example.org/{i}.jpg\n" for i in range(images * 2)))
    return folder, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image-size", type=int, nargs=2, default=(500, 375))
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, captions = write_sources(Path(tmp), args.images, tuple(args.image_size))
        started = time.perf_counter()
        settings = ReferenceSettings(owner="benchmark.reference", images=str(folder), captions=str(captions),
                                     size=args.images)
        source = reference_source(settings, "zscl", paired=False)
        indexed = time.perf_counter()
        reference = decode_reference(source, args.resolution)
        done = time.perf_counter()
    per_image = (done - indexed) / len(reference) * 1000
    print(f"{len(reference)} images, {args.image_size[0]}x{args.image_size[1]} JPEG -> {args.resolution} px: "
          f"index {indexed - started:.2f} s, decode {done - indexed:.2f} s ({per_image:.1f} ms/image), "
          f"{reference.images.nbytes / 2**20:.1f} MiB in memory; 10,000 images: ~{per_image * 10:.0f} s, "
          f"{10000 * args.resolution ** 2 * 3 / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
