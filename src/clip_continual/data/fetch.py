"""What ``kedro data fetch`` does: download a dataset's files from their official URLs (the ones
torchvision's downloaders use, with the MD5 sums torchvision ships, in ``downloads.csv``),
resuming a cut download with an HTTP Range request, verifying each file, and extracting archives
atomically (into a temporary folder beside the destination, then renamed into place). Datasets
that cannot be downloaded automatically get instructions: where to get them, where to put them.

The download is a short loop over ``urllib.request`` rather than torchvision's ``download_url``
or a new dependency: torchvision neither resumes nor reports which URL failed, and ``requests``
is not one of the project's dependencies. Plain Python; no Kedro import.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from clip_continual.data.common import DataFormatError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
ATTEMPTS = 5
MARKER = ".fetched-{}"  # written beside a file's extracted contents once it is in place

MANUAL = {
    "stanford_cars": ("Stanford Cars cannot be downloaded automatically (its URL is dead, pytorch/vision#7545): "
                      "get the images from Kaggle (jessicali9530/stanford-cars-dataset), car_devkit.tgz and "
                      "cars_test_annos_withlabels.mat from the links in that issue, and put cars_train/, "
                      "cars_test/, devkit/ and the .mat file in the folder named above"),
    "imagenet_tiered_test": ("ImageNet needs an account: download ILSVRC2012_img_train.tar from image-net.org (or "
                             "the Kaggle 'imagenet-object-localization-challenge' copy) and unpack it to one folder "
                             "per WordNet id in the folder named above"),
    "flickr30k": ("Flickr30K is given out on request: fill in the form at "
                  "shannon.cs.illinois.edu/DenotationGraph, unpack flickr30k-images/ into the folder named above "
                  "and put Karpathy's dataset_flickr30k.json beside it"),
    "karpathy": ("Karpathy's split files come in caption_datasets.zip (cs.stanford.edu/people/karpathy/deepimagesent): "
                 "put dataset_coco.json in the COCO folder and dataset_flickr30k.json in the Flickr30K folder"),
    "zero_shot_folder": "point the zero_shot.root parameter at your image folder (one folder per class)",
    "conceptual_captions": ("Conceptual Captions: download Validation_GCC-1.1.0-Validation.tsv from "
                            "ai.google.com/research/ConceptualCaptions and fetch its images with ZSCL's gather_cc.py"),
}


class FetchError(DataFormatError):
    """A download or extraction failed; the message names the URL or file and what to do."""


@dataclass(frozen=True)
class Download:
    dataset: str
    url: str
    filename: str
    md5: str
    sha256: str
    kind: str  # archive | file | gunzip
    dest: str  # relative to the dataset's folder
    inner: str  # an archive inside the archive, extracted in turn


def downloads(dataset: str | None = None) -> list[Download]:
    text = resources.files("clip_continual.data").joinpath("downloads.csv").read_text(encoding="utf-8")
    rows = [Download(**row) for row in csv.DictReader(text.splitlines())]
    return [row for row in rows if dataset is None or row.dataset == dataset]


def how_to_get(dataset: str) -> str:
    """The fix for a missing dataset: the fetch command, or the manual steps."""
    if downloads(dataset):
        extra = f" ({MANUAL['karpathy']})" if dataset == "coco2014" else ""
        return f"Run `kedro data fetch --dataset {dataset}`{extra}."
    return MANUAL.get(dataset, f"see the README's data section for '{dataset}'") + "."


def _digest(path: Path, item: Download) -> tuple[str, str, str]:
    """(algorithm, expected, found) for the checksum the repository keeps for ``item``."""
    algorithm, expected = ("sha256", item.sha256) if item.sha256 else ("md5", item.md5)
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return algorithm, expected, digest.hexdigest()


def _open(url: str, start: int):
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        return urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # the part file is already whole
            return None
        raise FetchError(f"download failed: HTTP {error.code} {error.reason} for {url}. The file may have "
                         f"moved: see the README's data section for mirrors.") from error
    except (urllib.error.URLError, OSError) as error:
        raise FetchError(f"download failed: cannot reach {url} ({error}). Check the connection "
                         f"(or a proxy: HTTPS_PROXY) and run the command again; it resumes.") from error


def _receive(url: str, part: Path, progress: bool) -> bool:
    """One attempt: append what the server sends to ``part``; True when the file is complete."""
    start = part.stat().st_size if part.exists() else 0
    response = _open(url, start)
    if response is None:
        return True
    with response:
        resumed = response.status == 206
        total = int(response.headers.get("Content-Length") or 0) + (start if resumed else 0)
        with part.open("ab" if resumed else "wb") as out, tqdm(
                total=total or None, initial=start if resumed else 0, unit="B", unit_scale=True,
                unit_divisor=1024, desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as error:
                logger.warning("download of %s cut at %d bytes (%s); resuming", url, out.tell(), error)
                return False
        return not total or part.stat().st_size >= total


def download(item: Download, folder: Path, progress: bool = True) -> Path:
    """``item``'s file in ``folder``, downloaded (resumed after a cut connection) and verified;
    a file whose checksum differs is deleted and refused."""
    folder.mkdir(parents=True, exist_ok=True)
    target, part = folder / item.filename, folder / f"{item.filename}.part"
    if not target.exists():
        for _ in range(ATTEMPTS):
            if _receive(item.url, part, progress):
                break
        else:
            raise FetchError(f"download of {item.url} was cut {ATTEMPTS} times; run the command again to resume it")
        part.rename(target)
    if item.md5 or item.sha256:
        algorithm, expected, found = _digest(target, item)
        if found != expected:
            target.unlink()
            raise FetchError(f"{item.filename} from {item.url} has {algorithm} {found}, not {expected} as "
                             f"published: the file was deleted and nothing extracted. Run the command again; "
                             f"if it fails twice the server sends another file: get it from a mirror.")
    else:
        logger.warning("%s has no published checksum; not verified (sha256 %s)", item.filename,
                       _digest(target, Download(**{**item.__dict__, "sha256": "x"}))[2])
    return target


def _unpack(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(into)
    else:
        with tarfile.open(archive) as bundle:
            bundle.extractall(into, filter="data")  # no paths outside ``into``, no device files


def extract(archive: Path, dest: Path, inner: str = "") -> None:
    """Unpack into a temporary folder beside ``dest``, then rename each top-level entry into
    ``dest``: a killed extraction leaves only the temporary folder, never a half folder."""
    dest.mkdir(parents=True, exist_ok=True)
    work = dest / f".extract-{archive.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _unpack(archive, work)
        if inner:
            _unpack(work / inner, work)
            shutil.rmtree(work / Path(inner).parts[0], ignore_errors=True)
        for entry in sorted(work.iterdir()):
            if not (dest / entry.name).exists():
                entry.rename(dest / entry.name)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise FetchError(f"cannot extract '{archive}' ({error}); delete it and run the command again") from error
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gunzip(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / source.name.removesuffix(".gz")
    work = dest / f".{target.name}.{os.getpid()}.tmp"
    with gzip.open(source, "rb") as packed, work.open("wb") as out:
        shutil.copyfileobj(packed, out, CHUNK)
    work.rename(target)


def fetch_file(item: Download, folder: Path, progress: bool = True) -> bool:
    """Download, verify and put in place one file of a dataset whose folder is ``folder``;
    False when an earlier fetch already did."""
    dest = (folder / item.dest).resolve()
    marker = dest / MARKER.format(item.filename)
    if marker.exists():
        return False
    downloaded = download(item, dest, progress)
    if item.kind == "archive":
        extract(downloaded, dest, item.inner)
    elif item.kind == "gunzip":
        _gunzip(downloaded, dest)
    if item.kind != "file":
        downloaded.unlink()
    marker.write_text(f"{item.url}\n")
    return True


def fetch_dataset(dataset: str, folder: Path, progress: bool = True) -> str:
    """Fetch every file of ``dataset`` (whose folder is ``folder``); one line saying what was
    done, or how to get it by hand."""
    items = downloads(dataset)
    if not items:
        return f"MANUAL {dataset}: {how_to_get(dataset)} Folder: '{folder}'."
    fetched_before = any((folder / i.dest / MARKER.format(i.filename)).exists() for i in items)
    if folder.is_dir() and any(folder.iterdir()) and not fetched_before:
        return f"OK     {dataset}: '{folder}' is already there (not fetched; `kedro data check` verifies it)."
    done = [item.filename for item in items if fetch_file(item, folder, progress)]
    extra = f" Also: {MANUAL['karpathy']}." if dataset == "coco2014" else ""
    return f"OK     {dataset}: {'fetched ' + ', '.join(done) if done else 'already fetched'} in '{folder}'.{extra}"
