"""Thin nodes that read a benchmark's raw datasets, check every input before work starts,
prepare each split once as shards, and load the CLIP the benchmark starts from."""

from __future__ import annotations

import logging
from typing import Any, Callable

from clip_continual.data.coco import coco_crops
from clip_continual.data.common import DataFormatError, ImageSet
from clip_continual.data.eurosat import eurosat_splits
from clip_continual.data.image_folder import image_folder_index
from clip_continual.data.index import ImageIndex
from clip_continual.data.karpathy import coco_retrieval, flickr30k_retrieval
from clip_continual.data.loading import LoaderConfig
from clip_continual.data.reference import (
    ReferenceSettings, ReferenceSource, ReferenceStream, decode_reference, reference_source,
)
from clip_continual.data.shards import ShardRequest, ShardSettings
from clip_continual.data.tiered_imagenet import tiered_imagenet_test_index
from clip_continual.data.torchvision_sets import SPECS, load_split
from clip_continual.methods import method_class
from clip_continual.model.clip import ClipModel, ModelSpec
from clip_continual.model.sources import build_model, resolve_pretrained
from clip_continual.pipelines.continual_learning.nodes import evaluation_protocol, task_recipe
from clip_continual.runtime.benchmarks import Benchmark

logger = logging.getLogger(__name__)

ZERO_SHOT_KINDS = ("image_folder", "tiered_imagenet")


def _zero_shot(data: dict[str, Any]) -> ImageIndex:
    settings = data["zero_shot"]
    kind = settings.get("kind", "image_folder")
    if kind == "tiered_imagenet":
        return tiered_imagenet_test_index(settings["root"], settings.get("class_map"))
    if kind == "image_folder":
        return image_folder_index(settings["root"], settings.get("class_map"), name="zero_shot")
    raise DataFormatError(f"zero_shot.kind must be one of {', '.join(ZERO_SHOT_KINDS)}, got {kind!r}")


def _coco(data: dict[str, Any], split: str) -> ImageIndex:
    return coco_crops(data["coco_root"], data.get("coco_karpathy_json"), splits=(split,))[split]


def _eurosat(data: dict[str, Any], split: str) -> ImageIndex:
    return eurosat_splits(data["eurosat_root"], data.get("eurosat_test_per_class", 500))[split]


# How each raw split is read from the benchmark's ``data`` parameters.
RAW_SPLITS: dict[str, Callable[[dict[str, Any]], ImageIndex]] = {
    "coco_train": lambda data: _coco(data, "train"),
    "coco_test": lambda data: _coco(data, "test"),
    "eurosat_train": lambda data: _eurosat(data, "train"),
    "eurosat_test": lambda data: _eurosat(data, "test"),
    "zero_shot": _zero_shot,
    "coco_retrieval": lambda data: coco_retrieval(data["coco_root"], data.get("coco_karpathy_json")),
    "flickr_retrieval": lambda data: flickr30k_retrieval(
        data["flickr_root"], data.get("flickr_karpathy_json"), data.get("flickr_images")),
}


def _torchvision_split(key: str, split: str) -> Callable[[dict[str, Any]], Any]:
    def read(data: dict[str, Any]) -> Any:
        return load_split(key, data["root"], split, bool(data.get("download", False)))
    return read


def _cifar100_cil(split: str) -> Callable[[dict[str, Any]], Any]:
    def read(data: dict[str, Any]) -> Any:
        from clip_continual.data.class_incremental import cifar100_source

        return cifar100_source(data["root"], split, bool(data.get("download", False)))
    return read


# MTIL's eleven datasets and class-incremental CIFAR-100, read by torchvision from data.root.
RAW_SPLITS.update({f"mtil_{key}_{split}": _torchvision_split(key, split)
                   for key in SPECS
                   for split in ("train", "test")})
RAW_SPLITS.update({f"cifar100_cil_{split}": _cifar100_cil(split) for split in ("train", "test")})


def check_reference(reference: dict[str, Any], method: str, owner: str) -> ReferenceSource:
    """The files of the reference set when the method replays or distils on one (agem, gem,
    zscl), else nothing to read: ft or vr_lwf runs never ask for it."""
    cls = method_class(method)
    if "reference_set" not in cls.needs_inputs:
        return ReferenceSource()
    settings = ReferenceSettings.from_params(reference, owner)
    source = reference_source(settings, method, paired=cls.replays_pairs)
    logger.info("reference set: %d images, %d unpaired captions (%s)", len(source.index),
                len(source.captions), source.index.root)
    return source


def check_inputs(
    data: dict[str, Any], continual: dict[str, Any], loader: dict[str, Any], model: dict[str, Any],
    preparation: dict[str, Any], reference: dict[str, Any], method: str, seed: int,
    evaluation: dict[str, Any], overrides: dict[str, Any] | None = None, *, splits: tuple[str, ...],
    benchmark: Benchmark,
) -> tuple[ImageIndex | ReferenceSource, ...]:
    """Every setting and raw-data layout of the benchmark, checked before anything spends
    minutes; returns the raw splits (indices: file lists, boxes, labels), in ``splits`` order,
    then the reference set's source. A bad input raises one error naming the file or setting
    and how to fix it."""
    evaluation_protocol(evaluation, method, benchmark)  # e.g. a method that needs the task id, hidden
    for task in benchmark.task_names:
        task_recipe(method, continual, seed, benchmark, task, overrides).training_config().build_method().check_files()
    LoaderConfig.from_params(loader)
    ShardSettings(**preparation)
    resolve_pretrained(_spec(model), setting=f"{benchmark.params}.model")
    reference_files = check_reference(reference, method, f"{benchmark.params}.reference")
    indexes = []
    for split in splits:
        index = RAW_SPLITS[split](data)
        if len(index) == 0:
            raise DataFormatError(f"the raw split '{split}' has no examples; check the folder behind it")
        logger.info("raw split %s: %d examples, %d classes (%s)", split, len(index), len(index.class_names), index.root)
        indexes.append(index)
    return (*indexes, reference_files)


def prepare_reference_set(source: ReferenceSource, model: ClipModel,
                          loader: dict[str, Any] | None = None) -> ImageSet | ReferenceStream:
    """The reference set decoded once at the pretrained model's resolution (empty when the
    method needs none), or streamed from its files by ``loader``'s workers (``size: null``)."""
    return decode_reference(source, model.image_size, LoaderConfig.from_params(loader))


def prepare_split(index: ImageIndex, preparation: dict[str, Any]) -> ShardRequest:
    """The catalog's prepared-split dataset writes the shards (or keeps an up-to-date copy)."""
    return ShardRequest(index, ShardSettings(**preparation))


def _spec(model: dict[str, Any]) -> ModelSpec:
    return ModelSpec(model["architecture"], model.get("pretrained"), model.get("cache_dir"))


def load_pretrained_model(model: dict[str, Any], seed: int) -> ClipModel:
    """The CLIP the benchmark starts from: an open_clip tag or a local weights file (OpenAI's
    ``ViT-B-32.pt`` included), loaded as it is."""
    import torch

    torch.manual_seed(seed)  # only matters for parts a weights file leaves uninitialised
    clip = build_model(_spec(model))
    clip.metadata["source"] = {"architecture": model["architecture"], "pretrained": model.get("pretrained")}
    return clip
