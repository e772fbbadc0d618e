"""Features for evaluation: a model in eval mode on the evaluation device, normalised image
features (in-memory arrays or lazy sets read by DataLoader workers) and text features (token ids
cached per architecture), and the similarity scores every classifier and retrieval ranks by.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import LoaderConfig, StreamedImages, as_lazy
from clip_continual.model.adapters import image_classifier, image_routing
from clip_continual.model.clip import ClipModel, encode_images, encode_text, resolve_device

DEFAULT_BATCH_SIZE = 256


def _target_device(clip: ClipModel, device: str | torch.device | None) -> torch.device:
    if device is None:
        return clip.device
    target = resolve_device(str(device))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


@contextlib.contextmanager
def evaluating(clip: ClipModel, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Eval mode on ``device`` (default: where the model is) for the block; restores both.

    Each submodule's own train/eval flag is restored, so a partly frozen model comes back
    exactly as it was. A model living elsewhere is moved for the block and moved back: a move
    keeps the Parameter objects (an optimizer holding them stays valid) and is exact in fp32.
    """
    model = clip.model
    modes = [(module, module.training) for module in model.modules()]
    home = clip.device
    target = _target_device(clip, device)
    moved = target != home
    try:
        if moved:
            # Outside inference mode even if the caller is in it: moved parameters must stay
            # ordinary tensors that training can use again.
            with torch.inference_mode(False):
                model.to(target)
        model.eval()
        yield target
    finally:
        if moved:
            with torch.inference_mode(False):
                model.to(home)
        for module, training in modes:
            module.training = training


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; CPU (and other backends) run in fp32 for exact results."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")


def _embed_dim(clip: ClipModel) -> int:
    return int(clip.model_config["embed_dim"])


EvalImages = Any  # uint8 (N, H, W, 3) array, ImageSet, or a lazy set (prepared split, ImageIndex)


def _pixel_batches(clip: ClipModel, images: EvalImages, batch_size: int,
                   loader: LoaderConfig | None) -> Iterator[torch.Tensor]:
    """Preprocessed pixels batch by batch: in-memory arrays on the device as always, lazy sets
    through DataLoader workers with the model's test transform."""
    device = clip.device
    if isinstance(images, ImageSet):
        images = images.images
    if not isinstance(images, np.ndarray):
        for _, pixels in StreamedImages(as_lazy(images), loader).clean_batches(clip, batch_size, device):
            yield pixels
        return
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 array of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    for start in range(0, len(images), batch_size):
        yield clip.preprocess(images[start:start + batch_size], device)


def routed_feature_batches(clip: ClipModel, images: EvalImages, batch_size: int, loader: LoaderConfig | None = None,
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Normalised fp32 features batch by batch, each with the route every image took in a
    model that routes its images (``model.adapters.image_routing``; None in any other model);
    the caller holds eval mode and inference mode."""
    _check_batch_size(batch_size)
    routing = image_routing(clip.model)
    for pixels in _pixel_batches(clip, images, batch_size, loader):
        with _autocast(clip.device):
            features = encode_images(clip.model, pixels, normalize=False)
        # Normalise after the cast: half-precision norms would cost accuracy.
        yield F.normalize(features.float(), dim=-1), None if routing is None else routing.last_routes


def image_feature_batches(clip: ClipModel, images: EvalImages, batch_size: int,
                           loader: LoaderConfig | None = None) -> Iterator[torch.Tensor]:
    """Normalised fp32 features batch by batch; the caller holds eval mode and inference mode."""
    return (features for features, _ in routed_feature_batches(clip, images, batch_size, loader))


def image_features_and_routes(
    clip: ClipModel, images: EvalImages, batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None, loader: LoaderConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``image_features`` and each image's route (None unless the model routes its images)."""
    with evaluating(clip, device) as target, torch.inference_mode():
        chunks = list(routed_feature_batches(clip, images, batch_size, loader))
        features = torch.cat([f for f, _ in chunks]) if chunks else torch.empty(0, _embed_dim(clip), device=target)
        routed = bool(chunks) and chunks[0][1] is not None
        routes = torch.cat([r for _, r in chunks]) if routed else None
    # A clone outside inference mode is an ordinary tensor, usable later in autograd graphs.
    return features.clone(), None if routes is None else routes.clone()


def image_features(
    clip: ClipModel, images: EvalImages, batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None, loader: LoaderConfig | None = None,
) -> torch.Tensor:
    """L2-normalised fp32 image features (N, D) of uint8 (N, H, W, 3) images (or a lazy set),
    on the eval device."""
    return image_features_and_routes(clip, images, batch_size, device, loader)[0]


# --- class features per route (MoE-Adapters' DDAS) ---------------------------------------------

class RoutedClasses:
    """Class features of a model that routes its images: ``self[route]`` are the features the
    text tower gives under that route (computed when first asked for), against which the
    images that took the route are scored, as MoE-Adapters builds a text classifier per task
    (mtil/src/models/evaluation.py:20-41, 75)."""

    def __init__(self, compute: Callable[[int], torch.Tensor], single_use: bool = False) -> None:
        self._compute = compute
        self._done: dict[int, torch.Tensor] = {}
        self.single_use = single_use  # each route taken by one batch's images only (``forget``)

    def __getitem__(self, route: int) -> torch.Tensor:
        if route not in self._done:
            self._done[route] = self._compute(route)
        return self._done[route]

    def rows(self, rows: Sequence[int] | torch.Tensor | np.ndarray) -> RoutedClasses:
        """The features of some classes only, per route."""
        return RoutedClasses(lambda route: self[route][torch.as_tensor(rows, device=self[route].device)],
                             self.single_use)

    def forget(self, routes: torch.Tensor | None) -> None:
        """Drop the features of a batch's routes once it is scored, where routes are single-use
        (DIKI's and DPW's selector gives every chunk of images new ones), so that a streaming
        pass keeps one batch's classifiers, not one per test image (each image a route of its
        own where batches mix tasks: 10,000 × 100 classes × 512 floats, 2 GB, for a CIFAR-100
        phase at ViT-B/16). Routes that recur (DDAS's, one per task) stay cached."""
        if not self.single_use:
            return
        for route in ([] if routes is None else routes.unique().tolist()):
            self._done.pop(route, None)


def forget_routes(class_feats: Sequence[Any], routes: torch.Tensor | None) -> None:
    """``RoutedClasses.forget`` on each of ``class_feats`` that keeps features per route."""
    for feats in class_feats:
        if isinstance(feats, RoutedClasses):
            feats.forget(routes)


class FittedClasses:
    """Class features of a model that carries its own image classifier (RAIL,
    ``model.adapters.image_classifier``): the candidates' text features with their names, which
    the classifier matches to the classes it learnt; ``scores`` of images among them are its."""

    def __init__(self, features: torch.Tensor, names: Sequence[str], classifier: Any) -> None:
        if len(names) != len(features):
            raise ValueError(f"{len(names)} class names for {len(features)} class features")
        self.features, self.names, self.classifier = features, [str(n) for n in names], classifier

    def rows(self, rows: Sequence[int] | torch.Tensor | np.ndarray) -> FittedClasses:
        picked = torch.as_tensor(rows, device=self.features.device)
        return FittedClasses(self.features[picked], [self.names[i] for i in picked.tolist()], self.classifier)

    def to(self, device: torch.device) -> FittedClasses:
        return FittedClasses(as_float_tensor(self.features, device), self.names, self.classifier)

    def scores(self, image_feats: torch.Tensor) -> torch.Tensor:
        return self.classifier.scores(image_feats, self.features.to(image_feats.device), self.names)


ClassFeatures = Union[torch.Tensor, RoutedClasses, FittedClasses]


def class_features(clip: ClipModel, compute: Callable[[], torch.Tensor],
                   names: Sequence[str] | None = None) -> ClassFeatures:
    """``compute()`` (class features from the text tower, one row per class of ``names``), per
    route for a model that routes its images (``RoutedClasses``), or with the names for a model
    that carries its own image classifier (``FittedClasses``)."""
    classifier = image_classifier(clip.model)
    if classifier is not None:
        if names is None:
            raise ValueError("this model classifies with its own fitted classifier, which needs the class names")
        return FittedClasses(compute(), names, classifier)
    routing = image_routing(clip.model)
    if routing is None:
        return compute()

    def under(route: int) -> torch.Tensor:
        with routing.text_route(clip.model, route):
            return compute()
    return RoutedClasses(under, single_use=bool(getattr(routing, "single_use_routes", False)))


def class_rows(class_feats: ClassFeatures, rows: Sequence[int] | torch.Tensor | np.ndarray) -> ClassFeatures:
    if isinstance(class_feats, (RoutedClasses, FittedClasses)):
        return class_feats.rows(rows)
    return class_feats[torch.as_tensor(rows, device=class_feats.device)]


_TOKEN_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_TOKEN_CACHE_SIZE = 512  # chunks of prompts; a few MB of token ids


def cached_tokens(clip: ClipModel, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``texts``, tokenized once per architecture: every evaluation step re-encodes
    the same class prompts (MTIL: thousands, 12 times), and tokenizing them costs more than
    encoding them with a small model. The oldest entry goes first when the cache is full."""
    key = (clip.spec.architecture, clip.context_length, tuple(texts))
    tokens = _TOKEN_CACHE.get(key)
    if tokens is None:
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        tokens = _TOKEN_CACHE[key] = clip.tokenize(list(texts))
    return tokens


def text_features(
    clip: ClipModel, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """L2-normalised fp32 text features (N, D), one per text, on the eval device."""
    _check_batch_size(batch_size)
    texts = [str(text) for text in texts]
    with evaluating(clip, device) as target, torch.inference_mode():
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = cached_tokens(clip, texts[start:start + batch_size]).to(target)
            with _autocast(target):
                features = encode_text(clip.model, tokens, normalize=False)
            chunks.append(F.normalize(features.float(), dim=-1))
        features = torch.cat(chunks) if chunks else torch.empty(0, _embed_dim(clip), device=target)
    return features.clone()


# --- scores -------------------------------------------------------------------------------------

def as_float_tensor(values: Any, device: torch.device | None = None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    tensor = tensor.float()
    return tensor if device is None else tensor.to(device)


def similarity_scores(image_feats: torch.Tensor, class_feats: torch.Tensor) -> torch.Tensor:
    # NaN (a diverged model) must never win a comparison: it becomes the lowest score.
    return torch.nan_to_num(image_feats @ class_feats.T, nan=-torch.inf)


def routed_scores(image_feats: torch.Tensor, routes: torch.Tensor | None, class_feats: RoutedClasses) -> torch.Tensor:
    """(B, C) scores, each image against the class features of its own route."""
    if routes is None or len(routes) != len(image_feats):
        raise ValueError("class features per route need each image's route (the model routes its images)")
    scores = None
    for route in routes.unique().tolist():
        rows = (routes == route).nonzero().squeeze(1).to(image_feats.device)
        part = similarity_scores(image_feats[rows], as_float_tensor(class_feats[route], image_feats.device))
        if scores is None:
            scores = image_feats.new_empty(len(image_feats), part.shape[1])
        scores[rows] = part
    return scores if scores is not None else image_feats.new_empty(0, 0)
