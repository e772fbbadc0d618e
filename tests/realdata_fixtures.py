"""Writers of the raw formats users download, in miniature, for tests (plain functions, not tests).

Each writer puts into a given folder the exact on-disk layout of one public dataset, with tiny
real JPEGs, and returns what a correct reader must find there (crops, splits, class order), so
tests compare a reader's output with facts the writer knows rather than with the reader itself.

- ``write_coco2014``: ``annotations/instances_{train,val}2014.json``, ``train2014/``, ``val2014/``
  and Karpathy's ``dataset_coco.json`` (splits train / restval / val / test).
- ``write_flickr30k``: Karpathy's ``dataset_flickr30k.json`` and ``flickr30k-images/``.
- ``write_image_folder``: one folder per class, with an optional class map (JSON or CSV).
- ``write_eurosat``: the EuroSAT RGB layout (10 class folders of ``{Class}_{n}.jpg``).
- ``write_jpeg`` / ``write_truncated_jpeg`` / ``write_not_an_image``: single files.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_COCO_TABLE = """
1 person|2 bicycle|3 car|4 motorcycle|5 airplane|6 bus|7 train|8 truck|9 boat|10 traffic light
11 fire hydrant|13 stop sign|14 parking meter|15 bench|16 bird|17 cat|18 dog|19 horse|20 sheep
21 cow|22 elephant|23 bear|24 zebra|25 giraffe|27 backpack|28 umbrella|31 handbag|32 tie
33 suitcase|34 frisbee|35 skis|36 snowboard|37 sports ball|38 kite|39 baseball bat
40 baseball glove|41 skateboard|42 surfboard|43 tennis racket|44 bottle|46 wine glass|47 cup
48 fork|49 knife|50 spoon|51 bowl|52 banana|53 apple|54 sandwich|55 orange|56 broccoli
57 carrot|58 hot dog|59 pizza|60 donut|61 cake|62 chair|63 couch|64 potted plant|65 bed
67 dining table|70 toilet|72 tv|73 laptop|74 mouse|75 remote|76 keyboard|77 cell phone
78 microwave|79 oven|80 toaster|81 sink|82 refrigerator|84 book|85 clock|86 vase|87 scissors
88 teddy bear|89 hair drier|90 toothbrush
"""
# The 80 COCO 2014 object categories as (id, name), with the id gaps of the real files.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = tuple(
    (int(entry.split(" ", 1)[0]), entry.split(" ", 1)[1])
    for entry in _COCO_TABLE.replace("\n", "|").split("|") if entry
)

# EuroSAT RGB: the 10 class folders as they unpack (2750/ in EuroSAT.zip, EuroSAT_RGB/ later).
EUROSAT_FOLDERS = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)


def class_colour(class_index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class, so a test can tell which box a crop came from."""
    rng = np.random.default_rng(1000 + class_index)
    return tuple(int(v) for v in rng.integers(30, 226, size=3))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_jpeg(
    path: Path, width: int = 16, height: int = 12, colour: tuple[int, int, int] = (120, 90, 60),
    boxes: list[tuple[list[float], tuple[int, int, int]]] = (),
) -> Path:
    """A real JPEG of one colour, with ``boxes`` ((x, y, w, h), colour) painted on it."""
    image = Image.new("RGB", (width, height), colour)
    draw = ImageDraw.Draw(image)
    for (x, y, w, h), box_colour in boxes:
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=box_colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(image))
    return path


def write_truncated_jpeg(path: Path, width: int = 32, height: int = 24) -> Path:
    """A JPEG cut off half-way: it opens (the header is intact) but fails to decode."""
    noise = np.random.default_rng(7).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    data = _jpeg_bytes(Image.fromarray(noise))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_not_an_image(path: Path) -> Path:
    """A file with an image's name and no image in it (e.g. an HTML error page saved as .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"<html><body>403 Forbidden</body></html>")
    return path


# --------------------------------------------------------------------------------------------
# COCO 2014 + Karpathy dataset_coco.json
# --------------------------------------------------------------------------------------------


@dataclass
class Crop:
    """One expected crop: image path relative to the COCO root, box (x, y, w, h), class index."""

    path: str
    box: tuple[float, float, float, float]
    label: int


@dataclass
class CocoFixture:
    root: Path
    karpathy_json: Path
    class_names: list[str]  # in category-id order
    train: list[Crop] = field(default_factory=list)
    val: list[Crop] = field(default_factory=list)
    test: list[Crop] = field(default_factory=list)
    restval_boxes: int = 0  # boxes on restval images (in no crop split)
    small_boxes: int = 0  # boxes with width or height <= 4 px (in no crop split)
    test_images: list[str] = field(default_factory=list)  # Karpathy test images, file order
    test_captions: list[list[str]] = field(default_factory=list)  # the first five of each


def _box_grid(count: int, width: int) -> list[list[float]]:
    """``count`` non-overlapping boxes, each wider and taller than 4 px, in rows of four."""
    boxes = []
    for slot in range(count):
        row, column = divmod(slot, 4)
        x, y = 2.5 + column * (width // 4), 2.0 + row * 14
        boxes.append([x, y, 6.0 + slot % 3, 5.0 + slot % 2 * 3.5])
    return boxes


def _caption_sentences(image_number: int, count: int) -> list[dict]:
    return [
        {"raw": f"Image {image_number} caption {k}.", "tokens": ["image", str(image_number), "caption", str(k)],
         "imgid": image_number, "sentid": image_number * 10 + k}
        for k in range(count)
    ]


class _CocoWriter:
    """Accumulates the two instances files and Karpathy's file while JPEGs are written."""

    def __init__(self, root: Path, categories: tuple[tuple[int, str], ...], boxes_per_image: int):
        self.root = root
        self.categories = categories
        self.order = {cid: index for index, (cid, _) in enumerate(sorted(categories))}
        self.boxes_per_image = boxes_per_image
        self.instances = {split: {"images": [], "annotations": []} for split in ("train2014", "val2014")}
        self.karpathy: list[dict] = []
        self.next_image_id, self.next_annotation_id = 9, 1

    def add_image(self, folder: str, karpathy_split: str | None, class_ids: list[int],
                  small_boxes: int = 0, sentences: int = 5) -> list[Crop]:
        image_id, width, height = self.next_image_id, 64, 44
        self.next_image_id += 7  # real ids are sparse
        file_name = f"COCO_{folder}_{image_id:012d}.jpg"
        boxes = _box_grid(len(class_ids), width)
        painted = [(box, class_colour(self.order[cid])) for box, cid in zip(boxes, class_ids)]
        write_jpeg(self.root / folder / file_name, width, height, boxes=painted)
        small = [[40.0, 30.0, 4.0, 9.0], [50.0, 30.0, 9.0, 3.5], [5.0, 30.0, 2.0, 2.0]][:small_boxes]
        for box, cid in zip(boxes + small, class_ids + [class_ids[0]] * len(small)):
            self._annotate(folder, image_id, box, cid)
        self.instances[folder]["images"].append(
            {"license": 1, "file_name": file_name, "coco_url": "", "height": height, "width": width,
             "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        if karpathy_split is not None:
            number = len(self.karpathy)
            self.karpathy.append({
                "filepath": folder, "sentids": [number * 10 + k for k in range(sentences)],
                "filename": file_name, "imgid": number, "split": karpathy_split,
                "sentences": _caption_sentences(number, sentences), "cocoid": image_id})
        return [Crop(f"{folder}/{file_name}", tuple(box), self.order[cid]) for box, cid in zip(boxes, class_ids)]

    def _annotate(self, folder: str, image_id: int, box: list[float], category_id: int) -> None:
        self.instances[folder]["annotations"].append(
            {"segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3]]],
             "area": box[2] * box[3], "iscrowd": 0, "image_id": image_id, "bbox": box,
             "category_id": category_id, "id": self.next_annotation_id})
        self.next_annotation_id += 1

    def add_images(self, folder: str, split: str | None, class_ids: list[int], small_every: int = 0) -> list[Crop]:
        crops = []
        for number, start in enumerate(range(0, len(class_ids), self.boxes_per_image)):
            small = 1 + number % 3 if small_every and number % small_every == 0 else 0
            sentences = 6 if number == 1 else 5  # a few Karpathy images have more than five
            crops += self.add_image(folder, split, class_ids[start:start + self.boxes_per_image], small, sentences)
        return crops

    def write_json(self, karpathy_json: Path) -> None:
        categories = [{"supercategory": "thing", "id": cid, "name": name} for cid, name in self.categories]
        for folder, content in self.instances.items():
            document = {"info": {"description": "COCO 2014 Dataset (test fixture)"}, "licenses": [],
                        "type": "instances", **content, "categories": categories}
            path = self.root / "annotations" / f"instances_{folder}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(document))
        karpathy_json.write_text(json.dumps({"images": self.karpathy, "dataset": "coco"}))


def write_coco2014(
    root: Path, categories: tuple[tuple[int, str], ...] = COCO_CATEGORIES, *,
    train_boxes_per_class: int = 2, boxes_per_image: int = 8, karpathy_json: Path | None = None,
) -> CocoFixture:
    """The COCO 2014 layout under ``root`` with every category in the train, val and test crops.

    Train images carry ``train_boxes_per_class`` boxes per class; Karpathy's val and test images
    one box per class each; two restval images carry boxes that belong to no crop split; some
    images carry boxes with a side <= 4 px. ``categories`` are written in the order given (the
    real file lists them by id); class indices follow id order.
    """
    root = Path(root)
    karpathy_json = Path(karpathy_json or root / "dataset_coco.json")
    writer = _CocoWriter(root, categories, boxes_per_image)
    ids = [cid for cid, _ in sorted(categories)]
    fixture = CocoFixture(root, karpathy_json, [name for _, name in sorted(categories)])
    fixture.train = writer.add_images("train2014", "train", ids * train_boxes_per_class, small_every=2)
    fixture.val = writer.add_images("val2014", "val", ids, small_every=3)
    restval = writer.add_images("val2014", "restval", ids[:boxes_per_image * 2])
    fixture.restval_boxes = len(restval)
    test_start = len(writer.karpathy)
    fixture.test = writer.add_images("val2014", "test", ids, small_every=2)
    writer.add_image("val2014", None, ids[:2])  # a val2014 image in no Karpathy split
    fixture.small_boxes = sum(
        1 for content in writer.instances.values() for a in content["annotations"]
        if a["bbox"][2] <= 4 or a["bbox"][3] <= 4)
    writer.write_json(karpathy_json)
    for entry in writer.karpathy[test_start:]:
        fixture.test_images.append(f"{entry['filepath']}/{entry['filename']}")
        fixture.test_captions.append([s["raw"] for s in entry["sentences"][:5]])
    return fixture


# --------------------------------------------------------------------------------------------
# Flickr30K (Karpathy dataset_flickr30k.json)
# --------------------------------------------------------------------------------------------


@dataclass
class FlickrFixture:
    root: Path
    karpathy_json: Path
    images_dir: Path
    test_images: list[str]  # file names, file order
    test_captions: list[list[str]]


def write_flickr30k(root: Path, *, train: int = 3, val: int = 2, test: int = 6) -> FlickrFixture:
    """``root/dataset_flickr30k.json`` and ``root/flickr30k-images/{id}.jpg``; splits interleaved."""
    root = Path(root)
    images_dir = root / "flickr30k-images"
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    order = np.random.default_rng(3).permutation(len(splits))
    entries, test_images, test_captions = [], [], []
    for number, position in enumerate(order):
        file_name = f"{1000092795 + 37 * number}.jpg"
        write_jpeg(images_dir / file_name, 20, 14, colour=class_colour(number))
        sentences = _caption_sentences(number, 5)
        entries.append({"sentids": [s["sentid"] for s in sentences], "imgid": number,
                        "sentences": sentences, "split": splits[position], "filename": file_name})
        if splits[position] == "test":
            test_images.append(file_name)
            test_captions.append([s["raw"] for s in sentences])
    karpathy_json = root / "dataset_flickr30k.json"
    karpathy_json.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return FlickrFixture(root, karpathy_json, images_dir, test_images, test_captions)


# --------------------------------------------------------------------------------------------
# Image folders: zero-shot sets, EuroSAT
# --------------------------------------------------------------------------------------------


def write_image_folder(
    root: Path, images_per_class: dict[str, int], *, class_map: dict[str, str] | None = None,
    map_format: str = "json", extension: str = ".JPEG",
) -> Path | None:
    """One folder per class under ``root`` (``{folder}_{n}{extension}``) and, when ``class_map``
    is given, the map next to it (``root``'s parent, ``class_map.json`` or ``class_map.csv``
    with a ``folder,name`` header). Returns the map's path, else None."""
    root = Path(root)
    for index, (folder, count) in enumerate(sorted(images_per_class.items())):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            write_jpeg(root / folder / f"{folder}_{n}{extension}", 10, 8, colour=class_colour(index))
    if class_map is None:
        return None
    path = root.parent / f"class_map.{map_format}"
    if map_format == "json":
        path.write_text(json.dumps(class_map, indent=1))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["folder", "name"])
            writer.writerows(class_map.items())
    return path


@dataclass
class EuroSatFixture:
    root: Path
    counts: dict[str, int]
    files: dict[str, list[str]]  # per class folder, file names sorted as strings


def write_eurosat(root: Path, counts: dict[str, int] | int = 13, *, size: int = 4) -> EuroSatFixture:
    """The EuroSAT RGB layout: ``root/{Class}/{Class}_{n}.jpg``, n from 1 (not zero-padded, so
    name order differs from number order, as in the real files). ``counts``: images per class."""
    root = Path(root)
    if isinstance(counts, int):
        counts = {folder: counts + index % 3 for index, folder in enumerate(EUROSAT_FOLDERS)}
    files = {}
    for index, (folder, count) in enumerate(counts.items()):
        names = [f"{folder}_{n}.jpg" for n in range(1, count + 1)]
        data = _jpeg_bytes(Image.new("RGB", (size, size), class_colour(index)))  # encoded once: fast
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(data)
        files[folder] = sorted(names)
    return EuroSatFixture(root, dict(counts), files)


# --------------------------------------------------------------------------------------------
# Reference sets: LAION pairs as img2dataset writes them, Conceptual Captions
# --------------------------------------------------------------------------------------------


def reference_caption(n: int) -> str:
    return f"a photo number {n} of something"


def write_img2dataset_pairs(root: Path, count: int, *, shard_size: int = 4) -> list[str]:
    """img2dataset's ``files`` output (CL-CLIP's LAION subset): ``{shard:05d}/{key}.jpg`` beside
    ``{key}.json`` with its key and caption, plus a ``{shard:05d}_stats.json`` per shard.
    Returns the captions in key order."""
    root = Path(root)
    for n in range(count):
        shard, key = root / f"{n // shard_size:05d}", f"{n:09d}"
        write_jpeg(shard / f"{key}.jpg", 12, 10, colour=class_colour(n))
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "caption": reference_caption(n), "status": "success"}))
        (root / f"{n // shard_size:05d}_stats.json").write_text(json.dumps({"count": shard_size}))
    return [reference_caption(n) for n in range(count)]


def write_conceptual_captions_tsv(path: Path, count: int) -> list[str]:
    """A Conceptual Captions TSV as Google serves it: ``caption<TAB>url`` per line, no header."""
    captions = [reference_caption(n) for n in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c}\thttps://example.org/{n}.jpg\n" for n, c in enumerate(captions)))
    return captions


def write_gather_cc(root: Path, count: int) -> Path:
    """What ZSCL's ``mtil/gather_cc.py`` leaves: ``cc_data/val/{uid % 1000}/{uid}.jpg`` and
    ``Validation_GCC-1.1.0-Validation_output.csv`` (``title<TAB>filepath`` after a header)."""
    root = Path(root)
    rows = []
    for uid in range(count):
        relative = f"cc_data/val/{uid % 1000}/{uid}.jpg"
        write_jpeg(root / relative, 12, 10, colour=class_colour(uid))
        rows.append(f"{reference_caption(uid)}\t{relative}\n")
    path = root / "Validation_GCC-1.1.0-Validation_output.csv"
    path.write_text("title\tfilepath\n" + "".join(rows))
    return path
