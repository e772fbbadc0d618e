"""The paper's held-out zero-shot set: the tiered-ImageNet test classes, read from ImageNet.

tiered-ImageNet (Ren et al., ICLR 2018) splits 608 ILSVRC-12 classes by high-level WordNet node;
its test split is 160 classes under 8 nodes. The class list shipped here,
``tiered_imagenet_test_classes.csv`` (WordNet id, node, first WordNet lemma as the class name),
is the published ``test.csv`` of the authors' repository (GitHub ``renmengye/few-shot-ssl-public``,
``fewshot/data/tiered_imagenet_split/test.csv``; names from ``words.txt`` beside it), the list that
``yaoyao-liu/tiered-imagenet-tools`` (the path in CL-CLIP ``main.py``'s ``--zs_img``) also uses.
Like those tools we take every image of each class from a user's ImageNet folder whose class
folders are named by WordNet id (ILSVRC2012 ``train/``, or a generated ``tiered_imagenet/test/``).

Expected layout::

    imagenet/train/
        n01440764/n01440764_10026.JPEG ...   (the 160 test classes must be among the folders)

Plain Python; no Kedro import.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from clip_continual.data.image_folder import image_folder_index
from clip_continual.data.index import ImageIndex

CLASS_LIST = "tiered_imagenet_test_classes.csv"


def tiered_imagenet_test_classes() -> list[tuple[str, str]]:
    """The 160 test classes as (WordNet id, class name), in the published file's order."""
    text = resources.files("clip_continual.data").joinpath(CLASS_LIST).read_text(encoding="utf-8")
    return [(row["wnid"], row["name"]) for row in csv.DictReader(text.splitlines())]


def tiered_imagenet_test_index(
    imagenet_dir: str | Path, class_map: str | Path | dict[str, str] | None = None,
) -> ImageIndex:
    """Every image of the 160 tiered-ImageNet test classes under ``imagenet_dir``.

    Classes follow sorted WordNet id (``ImageFolder`` order); names are the shipped first
    WordNet lemmas unless ``class_map`` (folder -> name, JSON or CSV) is given.
    """
    classes = tiered_imagenet_test_classes()
    return image_folder_index(
        imagenet_dir, class_map if class_map is not None else dict(classes),
        folders=[wnid for wnid, _ in classes], name="tiered_imagenet_test",
        missing_fix="Point the parameter at ImageNet's train folder (ILSVRC2012_img_train.tar unpacked, "
                    "one folder per WordNet id) or at a tiered-ImageNet test folder.",
    )
