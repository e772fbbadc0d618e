"""Pixels on demand: the model's transforms and DataLoaders over lazy image sets.

Two sources feed the training loop and the evaluation through one interface:

- ``InMemoryImages``: an ``ImageSet`` (the small embedded sets), preprocessed on the device
  exactly as before (a batch is a pure function of the step);
- ``StreamedImages``: a lazy set (a prepared split of WebDataset shards, or a raw
  ``ImageIndex``), decoded by ``torch.utils.data.DataLoader`` workers with the paper's
  transforms at the model's resolution and normalisation.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from clip_continual.data.common import ImageSet
from clip_continual.data.images import open_image
from clip_continual.data.index import ImageIndex

# The paper's transforms (PAPER.md; CL-CLIP data.py): train = resize 256 bicubic, random crop
# 224, horizontal flip; test = resize 224 bicubic, centre crop 224. At another resolution S the
# train resize scales with it: S * 256 / 224.
TRAIN_RESIZE_RATIO = 256 / 224


class LoaderConfigError(ValueError):
    """A data-loader parameter is unknown or invalid."""


@dataclass(frozen=True)
class LoaderConfig:
    """How DataLoader workers feed a lazy image set. ``pin_memory``: "auto" pins on CUDA."""

    num_workers: int = 0
    pin_memory: bool | str = "auto"
    persistent_workers: bool = True
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise LoaderConfigError(f"loader num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.pin_memory not in (True, False, "auto"):
            raise LoaderConfigError(f"loader pin_memory must be true, false or auto, got {self.pin_memory!r}")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            raise LoaderConfigError(f"loader prefetch_factor must be a positive integer, got {self.prefetch_factor!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> LoaderConfig:
        params = dict(params or {})
        unknown = sorted(set(params) - {f.name for f in fields(cls)})
        if unknown:
            raise LoaderConfigError(
                f"unknown loader parameter(s) {unknown}; known: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**params)

    def loader_kwargs(self, device: torch.device) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "pin_memory": device.type == "cuda" if self.pin_memory == "auto" else bool(self.pin_memory),
            "persistent_workers": self.persistent_workers and workers > 0,
            "prefetch_factor": self.prefetch_factor if workers > 0 else None,
        }


class TrainTransform:
    """Resize the shorter side to S * 256/224 (bicubic), random S x S crop, random horizontal
    flip, normalise. The randomness comes from the ``rng`` given per call, so an example's
    augmentation is a function of (seed, step, example), whichever worker decodes it."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = image_size
        self.resize = T.Resize(max(image_size, round(image_size * TRAIN_RESIZE_RATIO)),
                               interpolation=T.InterpolationMode.BICUBIC)
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = self.resize(image)
        left = int(rng.integers(0, image.width - self.size + 1))
        top = int(rng.integers(0, image.height - self.size + 1))
        image = image.crop((left, top, left + self.size, top + self.size))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.finish(image)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> TrainTransform:
    return TrainTransform(image_size, mean, std)


ZSCL_CROP_SCALE = (0.9, 1.0)  # ZSCL mtil/clip/clip.py: RandomResizedCrop(n_px, scale=(0.9, 1.0))
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, which ZSCL keeps


def random_resized_box(height: int, width: int, rng: np.random.Generator,
                       scale: tuple[float, float] = ZSCL_CROP_SCALE) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop as torchvision's RandomResizedCrop draws it
    (area fraction in ``scale``, aspect ratio log-uniform in 3/4..4/3, ten tries, then the
    centre clipped to that ratio range), from ``rng`` so that an augmentation is reproducible."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    w, h = width, height
    if aspect < CROP_RATIO[0]:
        h = round(width / CROP_RATIO[0])
    elif aspect > CROP_RATIO[1]:
        w = round(height * CROP_RATIO[1])
    return (height - h) // 2, (width - w) // 2, h, w


class ZsclTrainTransform:
    """ZSCL's train transform (ZSCL mtil/clip/clip.py, ``_transform(n_px, is_train=True)``):
    RandomResizedCrop(S, scale=(0.9, 1.0), bicubic), then normalise; the crop is drawn from the
    ``rng`` given per call, like ``TrainTransform``."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = image_size
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        top, left, height, width = random_resized_box(image.height, image.width, rng)
        crop = image.crop((left, top, left + width, top + height))
        return self.finish(crop.resize((self.size, self.size), Image.Resampling.BICUBIC))


TRAIN_TRANSFORMS = {"crop_flip": TrainTransform, "zscl": ZsclTrainTransform}


def model_resolution(image_size: int) -> Callable[[Image.Image], Image.Image]:
    """The test transform's geometry: shorter side resized to S (bicubic), centre S x S crop."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    return T.Compose([model_resolution(image_size), T.ToTensor(), T.Normalize(mean, std)])


class ModelResolutionArray:
    """An image as the uint8 (S, S, 3) array of the test transform before normalisation: what
    ``ClipModel.preprocess`` turns into exactly the test transform's pixels."""

    def __init__(self, image_size: int):
        self.geometry = model_resolution(image_size)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return np.array(self.geometry(image), dtype=np.uint8)


class LazyImages(Protocol):
    """A classified (or captioned) image set whose pixels are read one example at a time."""

    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...
    def open_image(self, i: int) -> Image.Image: ...
    def restrict_to_classes(self, classes: Sequence[int]) -> LazyImages: ...


class _TransformedImages(Dataset):
    """Example ``i`` -> ``(i, pixels)``; with a train transform the key is ``(i, step)`` and the
    result ``(i, augmented pixels[, clean pixels])``, augmented from the stream (seed, step, i)."""

    def __init__(self, images: LazyImages, transform: Callable, clean_transform: Callable | None = None,
                 seed: int | None = None):
        self.images = images
        self.transform = transform
        self.clean_transform = clean_transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        if self.seed is None:
            return int(key), self.transform(self.images.open_image(int(key)))
        i, step = (int(k) for k in key)
        image = self.images.open_image(i)
        pixels = self.transform(image, np.random.default_rng([self.seed, step, i]))
        if self.clean_transform is None:
            return i, pixels
        return i, pixels, self.clean_transform(image)


@dataclass
class TrainBatch:
    indices: np.ndarray
    pixels: torch.Tensor
    clean_pixels: torch.Tensor | None


class InMemoryImages:
    """An ``ImageSet`` behind the training interface; preprocessing on the device as always."""

    def __init__(self, image_set: ImageSet):
        self.image_set = image_set
        self.labels = image_set.labels
        self.class_names = image_set.class_names

    def __len__(self) -> int:
        return len(self.image_set)

    def train_batches(self, clip, batch_indices: Sequence[np.ndarray], device: torch.device,
                      augment: Callable | None, need_clean: bool, first_step: int = 0) -> Iterator[TrainBatch]:
        """``augment(step, images) -> pixels`` when the run augments, else None."""
        for step, indices in enumerate(batch_indices, start=first_step):
            images = self.image_set.images[indices]
            if augment is None:
                yield TrainBatch(indices, clip.preprocess(images, device), None)
            else:
                clean = clip.preprocess(images, device) if need_clean else None
                yield TrainBatch(indices, augment(step, images), clean)

    def clean_batches(self, clip, batch_size: int, device: torch.device) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for begin in range(0, len(self), batch_size):
            indices = np.arange(begin, min(begin + batch_size, len(self)))
            yield indices, clip.preprocess(self.image_set.images[indices], device)

    def image_arrays(self, clip, rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, images)`` in the order asked: the set's own uint8 arrays."""
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin:begin + batch_size]
            yield chunk, self.image_set.images[chunk]

    def array_shape(self, clip) -> tuple[int, ...]:
        return tuple(self.image_set.images.shape[1:])


class StreamedImages:
    """A lazy image set read through DataLoader workers with the model's transforms."""

    def __init__(self, images: LazyImages, loader: LoaderConfig | None = None):
        self.images = images
        self.loader = loader or LoaderConfig()
        self.labels = images.labels
        self.class_names = images.class_names
        self.captions = getattr(images, "captions", None)

    def __len__(self) -> int:
        return len(self.images)

    def _loader(self, dataset: Dataset, batch_sampler: list, device: torch.device) -> DataLoader:
        # Starting workers costs more than they save on a set of one batch.
        loader = self.loader if len(batch_sampler) > 1 else replace(self.loader, num_workers=0)
        # A DataLoader draws its workers' base seed from a generator; torch's global one is also
        # the one a method's own randomness uses (MoE's noisy routing), which reading files must
        # leave as reading memory does. The transforms take their randomness from (seed, step).
        return DataLoader(dataset, batch_sampler=batch_sampler, generator=torch.Generator().manual_seed(0),
                          **loader.loader_kwargs(device))

    def train_batches(self, clip, batch_indices: Sequence[np.ndarray], device: torch.device,
                      augment: bool | str, need_clean: bool, seed: int = 0) -> Iterator[TrainBatch]:
        """Batches in the given order; ``augment``: a train transform by name (True: the paper's
        crop_flip), else the test one."""
        mean, std, size = clip.image_mean, clip.image_std, clip.image_size
        clean = eval_transform(size, mean, std)
        if augment:
            dataset = _TransformedImages(self.images, TRAIN_TRANSFORMS["crop_flip" if augment is True else augment](
                size, mean, std), clean if need_clean else None, seed=seed)
            keys = [[(int(i), step) for i in batch] for step, batch in enumerate(batch_indices)]
        else:
            dataset = _TransformedImages(self.images, clean)
            keys = [[int(i) for i in batch] for batch in batch_indices]
        for item in self._loader(dataset, keys, device):
            indices, pixels = item[0].numpy(), item[1].to(device, non_blocking=True)
            clean_pixels = item[2].to(device, non_blocking=True) if len(item) > 2 else None
            yield TrainBatch(indices, pixels, clean_pixels)

    def clean_batches(self, clip, batch_size: int, device: torch.device) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        dataset = _TransformedImages(self.images, eval_transform(clip.image_size, clip.image_mean, clip.image_std))
        order = np.arange(len(self))
        batches = [order[b:b + batch_size].tolist() for b in range(0, len(order), batch_size)]
        for indices, pixels in self._loader(dataset, batches, device):
            yield indices.numpy(), pixels.to(device, non_blocking=True)

    def image_arrays(self, clip, rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, images)`` in the order asked, decoded by the workers at the model's
        resolution (``ModelResolutionArray``)."""
        return self.decoded(rows, batch_size, clip.image_size)

    def decoded(self, rows: np.ndarray, batch_size: int, image_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, uint8 images of image_size)`` in batches, in the order asked."""
        dataset = _TransformedImages(self.images, ModelResolutionArray(image_size))
        batches = [rows[b:b + batch_size].tolist() for b in range(0, len(rows), batch_size)]
        if not batches:
            return
        for indices, images in self._loader(dataset, batches, torch.device("cpu")):
            yield indices.numpy(), images.numpy()

    def array_shape(self, clip) -> tuple[int, ...]:
        return (clip.image_size, clip.image_size, 3)

    def caption_array(self) -> np.ndarray | None:
        """Captions as an (N, K) array of strings, '' where an image has fewer than K."""
        if self.captions is None:
            return None
        width = max((len(c) for c in self.captions), default=0)
        return np.asarray([list(c) + [""] * (width - len(c)) for c in self.captions], dtype=str).reshape(len(self), width)


TrainingSource = InMemoryImages | StreamedImages


@dataclass(frozen=True)
class TaskImages:
    """One task's training images as a method reads them besides the loop's batches (exemplar
    selection, a Fisher estimate), in memory or from files alike.

    ``arrays(rows)`` yields ``(rows, uint8 images)`` in the order asked: an in-memory set's own
    arrays; a lazy set's images decoded by the DataLoader workers at the model's resolution
    (``ModelResolutionArray``), of shape ``image_shape``. ``clip.preprocess`` of them is the
    model's input (for a lazy set: the test transform's pixels); kept, they are replayable.
    """

    source: TrainingSource
    clip: Any
    progress: bool = False

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.source.array_shape(self.clip)

    def __len__(self) -> int:
        return len(self.source)

    def arrays(self, rows: np.ndarray, batch_size: int = 256,
               desc: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = np.asarray(rows, dtype=np.int64)
        return iter(tqdm(self.source.image_arrays(self.clip, rows, batch_size), desc=desc, leave=False,
                         total=math.ceil(len(rows) / batch_size), disable=not self.progress))

    def gather(self, rows: np.ndarray, batch_size: int = 256, desc: str = "") -> np.ndarray:
        """The images of ``rows``, in that order, as one uint8 array."""
        chunks = [images for _, images in self.arrays(rows, batch_size, desc)]
        return np.concatenate(chunks) if chunks else np.zeros((0, *self.image_shape), np.uint8)


def training_source(data: ImageSet | LazyImages, loader: LoaderConfig | None = None) -> TrainingSource:
    """The training interface over an in-memory set or a lazy one."""
    if isinstance(data, (InMemoryImages, StreamedImages)):
        return data
    if isinstance(data, ImageSet):
        return InMemoryImages(data)
    return StreamedImages(as_lazy(data), loader)


def as_lazy(data: Any) -> LazyImages:
    """A raw ``ImageIndex`` opens its files with the format decoder; prepared splits read shards."""
    if hasattr(data, "open_image"):
        return data
    if isinstance(data, ImageIndex):
        return IndexImages(data)
    raise TypeError(f"cannot read images from {type(data).__name__}; expected an ImageSet, ImageIndex or prepared split")


class IndexImages:
    """A raw ``ImageIndex`` as a lazy set: each example is decoded (and cropped) from its file."""

    def __init__(self, index):
        self.index = index
        self.labels = index.labels
        self.class_names = index.class_names
        self.captions = index.captions

    def __len__(self) -> int:
        return len(self.index)

    def open_image(self, i: int) -> Image.Image:
        return open_image(self.index, i)

    def restrict_to_classes(self, classes: Sequence[int]) -> IndexImages:
        return IndexImages(self.index.restrict_to_classes(classes))

