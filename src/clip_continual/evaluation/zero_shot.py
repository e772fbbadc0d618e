"""Zero-shot classification, image-text retrieval and continual-learning metrics.

Plain Python, NumPy and PyTorch; no Kedro import. Every accuracy and recall is a fraction in
[0, 1]. Definitions follow PAPER.md:

- UT-Acc after step t: mean over phases i <= t of the mean per-class accuracy on phase i's
  classes, every image classified among ALL class prompts of the updated task (step 0, the
  starting model: mean over all phases).
- ZS-Acc: top-1 accuracy on a held-out set, class features averaged over prompt templates.
- Retrieval R@K image->text and text->image with several captions per image.
- Continual metrics over an accuracy matrix R of shape (T + 1, T): row t is the model after
  step t (row 0 the starting model), column i - 1 is task (phase) i.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import LoaderConfig, StreamedImages, as_lazy
from clip_continual.model.clip import ClipModel, encode_images, encode_text, resolve_device

DEFAULT_BATCH_SIZE = 256
RECALL_KS = (1, 5, 10)
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)
# Rows of the similarity matrix scored at once: bounds memory on the 5K x 25K COCO protocol.
RETRIEVAL_CHUNK = 1024


# --- running a model for evaluation ----------------------------------------------------------

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


def _image_feature_batches(clip: ClipModel, images: EvalImages, batch_size: int,
                           loader: LoaderConfig | None = None) -> Iterator[torch.Tensor]:
    """Normalised fp32 features batch by batch; the caller holds eval mode and inference mode."""
    _check_batch_size(batch_size)
    for pixels in _pixel_batches(clip, images, batch_size, loader):
        with _autocast(clip.device):
            features = encode_images(clip.model, pixels, normalize=False)
        # Normalise after the cast: half-precision norms would cost accuracy.
        yield F.normalize(features.float(), dim=-1)


def image_features(
    clip: ClipModel, images: EvalImages, batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None, loader: LoaderConfig | None = None,
) -> torch.Tensor:
    """L2-normalised fp32 image features (N, D) of uint8 (N, H, W, 3) images (or a lazy set),
    on the eval device."""
    with evaluating(clip, device) as target, torch.inference_mode():
        chunks = list(_image_feature_batches(clip, images, batch_size, loader))
        features = torch.cat(chunks) if chunks else torch.empty(0, _embed_dim(clip), device=target)
    # A clone outside inference mode is an ordinary tensor, usable later in autograd graphs.
    return features.clone()


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


def fill_template(template: str, class_name: str) -> str:
    """``template`` with the class name in its placeholder: ``{}``, ``{name}``, ``{label}`` or ``{classname}``."""
    try:
        prompt = template.format(class_name, name=class_name, label=class_name,
                                 classname=class_name, class_name=class_name)
    except (IndexError, KeyError) as error:
        raise ValueError(
            f"prompt template '{template}' has an unknown placeholder ({error}); use '{{}}' or '{{name}}'"
        ) from error
    if prompt == template:
        raise ValueError(
            f"prompt template '{template}' has no placeholder for the class name, e.g. 'a photo of a {{}}.'"
        )
    return prompt


def zero_shot_classifier(
    clip: ClipModel, class_names: Sequence[str], templates: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
) -> torch.Tensor:
    """(C, D) class features: per class, the mean of its normalised template prompts, renormalised."""
    if len(class_names) == 0:
        raise ValueError("zero_shot_classifier needs at least one class name")
    if len(templates) == 0:
        raise ValueError("zero_shot_classifier needs at least one prompt template")
    prompts = [fill_template(template, name) for name in class_names for template in templates]
    features = text_features(clip, prompts, batch_size, device)
    per_class = features.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


# --- classification ---------------------------------------------------------------------------

def _as_tensor(values: Any, device: torch.device | None = None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    tensor = tensor.float()
    return tensor if device is None else tensor.to(device)


def _scores(image_feats: torch.Tensor, class_feats: torch.Tensor) -> torch.Tensor:
    # NaN (a diverged model) must never win a comparison: it becomes the lowest score.
    return torch.nan_to_num(image_feats @ class_feats.T, nan=-torch.inf)


def predict(image_feats: torch.Tensor | np.ndarray, class_feats: torch.Tensor | np.ndarray) -> np.ndarray:
    """Index of the most similar class for each image; an exact tie goes to the lowest index."""
    images = _as_tensor(image_feats)
    classes = _as_tensor(class_feats, images.device)
    if images.ndim != 2 or classes.ndim != 2 or images.shape[1] != classes.shape[1]:
        raise ValueError(
            f"expected image features (N, D) and class features (C, D), got {tuple(images.shape)} "
            f"and {tuple(classes.shape)}"
        )
    if classes.shape[0] == 0:
        raise ValueError("cannot classify among zero classes")
    return _scores(images, classes).argmax(dim=1).cpu().numpy().astype(np.int64)


def predict_images(
    clip: ClipModel, images: EvalImages, class_feats: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
    loader: LoaderConfig | None = None,
) -> np.ndarray:
    """Predicted class of each image, streaming batches so no (N, D) feature matrix is kept."""
    with evaluating(clip, device) as target, torch.inference_mode():
        classes = _as_tensor(class_feats, target)
        predictions = [predict(batch, classes)
                       for batch in _image_feature_batches(clip, images, batch_size, loader)]
    return np.concatenate(predictions) if predictions else np.empty(0, dtype=np.int64)


def _check_predictions(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions and labels must be 1-D of equal length, got {predictions.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined: the evaluation set has no images")
    return predictions, labels


def top1_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose prediction equals the label."""
    predictions, labels = _check_predictions(predictions, labels)
    return float(np.mean(predictions == labels))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) accuracy of each class's images; NaN for a class without images."""
    predictions, labels = _check_predictions(predictions, labels)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    correct = np.bincount(labels, weights=(predictions == labels).astype(float), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, correct / counts, np.nan)


def _check_phases(phases: Sequence[Sequence[int]], num_classes: int | None = None) -> list[list[int]]:
    checked = [[int(c) for c in phase] for phase in phases]
    if not checked or any(len(phase) == 0 for phase in checked):
        raise ValueError(f"phases must be a non-empty list of non-empty class-id lists, got {phases}")
    ids = [c for phase in checked for c in phase]
    if min(ids) < 0 or (num_classes is not None and max(ids) >= num_classes):
        raise ValueError(f"phase class ids must lie in [0, {num_classes}), got [{min(ids)}, {max(ids)}]")
    return checked


def phase_accuracies(predictions: np.ndarray, labels: np.ndarray, phases: Sequence[Sequence[int]]) -> list[float]:
    """For each phase, the mean per-class accuracy over its classes (classes without images skipped).

    ``predictions`` come from classification among ALL classes, so confusing a class with one of
    another phase counts as an error.
    """
    phases = _check_phases(phases)
    labels = np.asarray(labels)
    num_classes = max(max(c for phase in phases for c in phase), int(labels.max(initial=-1))) + 1
    accuracy = per_class_accuracy(predictions, labels, num_classes)
    result = []
    for number, phase in enumerate(phases, start=1):
        present = accuracy[phase][~np.isnan(accuracy[phase])]
        if len(present) == 0:
            raise ValueError(f"phase {number} (classes {phase}) has no test images; its accuracy is undefined")
        result.append(float(present.mean()))
    return result


def seen_classes(phases: Sequence[Sequence[int]], step: int) -> list[int]:
    """The classes learnt by ``step`` (phases 1..step); at step 0, before any, every class."""
    phases = _check_phases(phases)
    learnt = phases[:step] if step > 0 else phases
    return sorted({c for phase in learnt for c in phase})


def seen_accuracy(seen_predictions: np.ndarray, labels: np.ndarray, seen: Sequence[int]) -> float:
    """Top-1 accuracy on the images of the ``seen`` classes, given each image's prediction
    among the seen classes only: what class-incremental papers report after each session."""
    labels = np.asarray(labels)
    rows = np.isin(labels, np.asarray(seen))
    return top1_accuracy(np.asarray(seen_predictions)[rows], labels[rows])


def seen_class_accuracy(image_feats: torch.Tensor, labels: np.ndarray, class_feats: torch.Tensor,
                        seen: Sequence[int]) -> float:
    """``seen_accuracy`` from image and class features held in memory."""
    seen = np.asarray(sorted(seen), dtype=np.int64)
    among_seen = predict(image_feats, class_feats[torch.from_numpy(seen).to(class_feats.device)])
    return seen_accuracy(seen[among_seen], labels, seen)


def _predictions_all_and_seen(
    clip: ClipModel, images: EvalImages, class_feats: torch.Tensor, seen: Sequence[int],
    batch_size: int, loader: LoaderConfig | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's class among all classes and among the ``seen`` ones, in one streaming pass
    (no (N, D) feature matrix kept); the caller holds eval mode."""
    seen = np.asarray(sorted(seen), dtype=np.int64)
    every, among_seen = [], []
    with torch.inference_mode():
        classes = _as_tensor(class_feats, clip.device)
        seen_classes_feats = classes[torch.from_numpy(seen).to(classes.device)]
        for batch in _image_feature_batches(clip, images, batch_size, loader):
            every.append(predict(batch, classes))
            among_seen.append(seen[predict(batch, seen_classes_feats)])
    empty = np.empty(0, dtype=np.int64)
    return (np.concatenate(every) if every else empty,
            np.concatenate(among_seen) if among_seen else empty)


# --- retrieval --------------------------------------------------------------------------------

def caption_index(captions: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Flatten (N, K) captions row by row into texts and the image index of each text.

    Empty strings mark missing captions (images with fewer than K) and are skipped.
    """
    captions = np.asarray(captions)
    if captions.ndim != 2:
        raise ValueError(f"captions must be an (N, K) array, got shape {captions.shape}")
    image_ids = np.repeat(np.arange(captions.shape[0]), captions.shape[1])
    texts = captions.reshape(-1).astype(str)
    keep = np.char.str_len(texts) > 0
    return texts[keep].tolist(), image_ids[keep].astype(np.int64)


def _recalls_one_fold(
    images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, ks: Sequence[int],
) -> dict[str, float]:
    """Recall@K; a competitor whose score ties the positive's counts as ranked ahead of it.

    Image query: the rank of its best caption is the number of OTHER images' captions scoring
    at least as high (its own captions are all positives, never competitors). Images without a
    caption are no query. Caption query: the number of other images scoring at least as high as
    its own image. So constant scores give the worst rank, never perfect recall.
    """
    n_images, n_texts = images.shape[0], texts.shape[0]
    i2t_hits = torch.zeros(len(ks), dtype=torch.long)
    i2t_queries = 0
    for start in range(0, n_images, RETRIEVAL_CHUNK):
        block = images[start:start + RETRIEVAL_CHUNK]
        sims = _scores(block, texts)
        query_ids = torch.arange(start, start + block.shape[0], device=owner.device)
        positive = owner[None, :] == query_ids[:, None]
        has_caption = positive.any(dim=1)
        best = sims.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)
        rank = ((sims >= best) & ~positive).sum(dim=1)[has_caption].cpu()
        i2t_hits += torch.stack([(rank < k).sum() for k in ks])
        i2t_queries += int(has_caption.sum())

    t2i_hits = torch.zeros(len(ks), dtype=torch.long)
    for start in range(0, n_texts, RETRIEVAL_CHUNK):
        block = texts[start:start + RETRIEVAL_CHUNK]
        sims = _scores(images, block)  # (n_images, B)
        own_image = owner[start:start + block.shape[0]]
        own_score = sims[own_image, torch.arange(block.shape[0], device=owner.device)]
        rank = ((sims >= own_score[None, :]).sum(dim=0) - 1).cpu()  # minus the own image
        t2i_hits += torch.stack([(rank < k).sum() for k in ks])

    metrics = {f"i2t_r{k}": float(hits) / max(i2t_queries, 1) for k, hits in zip(ks, i2t_hits.tolist())}
    metrics.update({f"t2i_r{k}": float(hits) / max(n_texts, 1) for k, hits in zip(ks, t2i_hits.tolist())})
    return metrics


def retrieval_metrics(
    image_feats: torch.Tensor | np.ndarray,
    text_feats: torch.Tensor | np.ndarray,
    text_image_index: Sequence[int] | np.ndarray,
    folds: int = 1,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Image->text and text->image Recall@K in [0, 1] (keys ``i2t_r{k}``, ``t2i_r{k}``).

    ``text_image_index[j]`` is the image that caption j describes. An image query hits at K when
    ANY of its captions ranks within the top K; a caption query hits when its image does. Ties
    count against the query (see ``_recalls_one_fold``). ``folds > 1`` splits the images into
    consecutive, near-equal folds, each with its own captions as the gallery, and averages the
    folds' metrics (``folds=5`` on COCO 5K gives the 1K-test protocol).
    """
    images = _as_tensor(image_feats)
    texts = _as_tensor(text_feats, images.device)
    owner = torch.as_tensor(np.asarray(text_image_index, dtype=np.int64), device=images.device)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"expected image features (N, D) and text features (M, D), got {tuple(images.shape)} "
            f"and {tuple(texts.shape)}"
        )
    if owner.ndim != 1 or owner.shape[0] != texts.shape[0]:
        raise ValueError(
            f"text_image_index must have one entry per text ({texts.shape[0]}), got shape {tuple(owner.shape)}"
        )
    n_images = images.shape[0]
    if n_images == 0 or texts.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(
            f"text_image_index values must lie in [0, {n_images}), got [{int(owner.min())}, {int(owner.max())}]"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {ks}")
    if folds < 1 or folds > n_images:
        raise ValueError(f"folds must lie in [1, {n_images}] (number of images), got {folds}")

    bounds = [round(f * n_images / folds) for f in range(folds + 1)]
    per_fold = []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        in_fold = (owner >= start) & (owner < stop)
        if not bool(in_fold.any()):
            raise ValueError(f"retrieval fold {number} (images {start}..{stop - 1}) has no caption")
        per_fold.append(_recalls_one_fold(images[start:stop], texts[in_fold], owner[in_fold] - start, ks))
    return {key: float(np.mean([fold[key] for fold in per_fold])) for key in per_fold[0]}


def _caption_array(retrieval_set: Any) -> np.ndarray:
    """(N, K) captions of an ``ImageSet``, or of a lazy set's per-image caption lists."""
    if retrieval_set.captions is None:
        raise ValueError("the retrieval set has no captions; prepare it with an (N, K) captions array")
    if isinstance(retrieval_set, ImageSet):
        return retrieval_set.captions
    return StreamedImages(as_lazy(retrieval_set)).caption_array()


def evaluate_retrieval(
    clip: ClipModel, retrieval_set: ImageSet | Any, batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None, folds: int = 1, loader: LoaderConfig | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 both ways of ``clip`` on a captioned image set (in memory or lazy)."""
    texts, owner = caption_index(_caption_array(retrieval_set))
    with evaluating(clip, device) as target:
        images = image_features(clip, retrieval_set, batch_size, target, loader)
        captions = text_features(clip, texts, batch_size, target)
    return retrieval_metrics(images, captions, owner, folds=folds)


# --- continual-learning metrics ---------------------------------------------------------------

def _check_matrix(R: Any) -> np.ndarray:
    """R as float (T + 1, T): row 0 the starting model, row t after task t, column i - 1 task i."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(
            f"accuracy matrix must have shape (T + 1, T) with T >= 1 (row 0 = starting model), got {R.shape}"
        )
    if not np.isfinite(R).all():
        raise ValueError("accuracy matrix contains NaN or infinite values")
    return R


def average_accuracy(R: Any) -> float:
    """Mean accuracy over all tasks after the last step: mean_j R[T][j]."""
    R = _check_matrix(R)
    return float(R[-1].mean())


def last_accuracy(R: Any) -> float:
    """MTIL "Last": mean_i R[T][i] (the same number as the average accuracy)."""
    return average_accuracy(R)


def average_incremental_accuracy(R: Any) -> float:
    """Mean over steps t = 1..T of the mean accuracy on the tasks seen so far, R[t][1..t]."""
    R = _check_matrix(R)
    T = R.shape[1]
    return float(np.mean([R[t, :t].mean() for t in range(1, T + 1)]))


def backward_transfer(R: Any) -> float:
    """BWT = 1/(T-1) sum_{i<T} (R[T][i] - R[i][i]); 0.0 when T < 2."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[T, i - 1] - R[i, i - 1] for i in range(1, T)]))


def forgetting(R: Any) -> float:
    """Chaudhry et al. 2018: mean over j < T of max_{j <= l <= T-1} R[l][j] - R[T][j]; 0.0 when T < 2."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[j:T, j - 1].max() - R[T, j - 1] for j in range(1, T)]))


def forward_transfer(R: Any) -> float:
    """FWT = 1/(T-1) sum_{i>=2} (R[i-1][i] - R[0][i]); 0.0 when T < 2."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[i - 1, i - 1] - R[0, i - 1] for i in range(2, T + 1)]))


def transfer(R: Any) -> float:
    """MTIL Transfer: mean over i >= 2 of mean over 1 <= t < i of R[t][i]; NaN when T < 2 (undefined)."""
    R = _check_matrix(R)
    T = R.shape[1]
    if T < 2:
        return float("nan")
    return float(np.mean([R[1:i, i - 1].mean() for i in range(2, T + 1)]))


def avg_accuracy(R: Any) -> float:
    """MTIL "Avg": mean of R[t][i] over all steps t = 1..T and tasks i = 1..T."""
    R = _check_matrix(R)
    return float(R[1:].mean())


def _check_partial(R: Any, t: int) -> np.ndarray:
    """Rows 0..t of an accuracy matrix (a run still in progress has no later rows)."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[1] < 1:
        raise ValueError(f"accuracy rows must form a 2-D array with one column per task, got {R.shape}")
    if not 0 <= t <= R.shape[1]:
        raise ValueError(f"step {t} is outside 0..T with T = {R.shape[1]} tasks")
    if R.shape[0] < t + 1:
        raise ValueError(f"step {t} needs accuracy rows 0..{t}, got {R.shape[0]} rows")
    return R


def ut_acc(R: Any, t: int) -> float:
    """Accuracy on the updated task after step t: mean over i <= t of R[t][i] (step 0: over all tasks)."""
    R = _check_partial(R, t)
    return float(R[t].mean() if t == 0 else R[t, :t].mean())


def bwt_at(R: Any, t: int) -> float:
    """Backward transfer after step t: mean over i < t of (R[t][i] - R[i][i]); 0.0 for t <= 1."""
    R = _check_partial(R, t)
    if t <= 1:
        return 0.0
    return float(np.mean([R[t, i - 1] - R[i, i - 1] for i in range(1, t)]))


def learning_accuracies(R: Any) -> list[float]:
    """The diagonal R[t][t]: the accuracy on each task right after learning it (Riemer et al.
    2019's "learning accuracy"), which forgetting cannot lower."""
    R = _check_matrix(R)
    return [float(R[t, t - 1]) for t in range(1, R.shape[1] + 1)]


def continual_metrics(R: Any) -> dict[str, float]:
    """Every continual metric of a complete (T + 1, T) accuracy matrix, by name."""
    R = _check_matrix(R)
    return {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forgetting": forgetting(R),
        "forward_transfer": forward_transfer(R),
        "transfer": transfer(R),
        "avg": avg_accuracy(R),
        "last": last_accuracy(R),
        "mean_learning_acc": float(np.mean(learning_accuracies(R))),
    }


# --- one continual step -----------------------------------------------------------------------

def _earlier_rows(previous_rows: Sequence[Sequence[float]] | None, step: int, num_tasks: int) -> list[list[float]]:
    """Rows 0..step-1, needed for BWT from step 2 on (their diagonal)."""
    if step < 2:
        return []
    if previous_rows is None or len(previous_rows) != step:
        have = "none" if previous_rows is None else len(previous_rows)
        raise ValueError(
            f"step {step} needs the acc rows of steps 0..{step - 1} ({step} rows) for BWT, got {have}"
        )
    rows = [[float(v) for v in row] for row in previous_rows]
    if any(len(row) != num_tasks for row in rows):
        raise ValueError(f"every earlier acc row must have {num_tasks} entries (one per phase)")
    return rows


def zero_shot_accuracy(
    clip: ClipModel,
    image_set: ImageSet | Any,
    templates: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    loader: LoaderConfig | None = None,
) -> float:
    """Top-1 accuracy of zero-shot classification among ``image_set``'s class names."""
    with evaluating(clip, device) as target:
        classes = zero_shot_classifier(clip, image_set.class_names, templates, batch_size, target)
        predictions = predict_images(clip, image_set, classes, batch_size, target, loader)
    return top1_accuracy(predictions, image_set.labels)


def _suite_metrics(
    clip: ClipModel, zero_shot_sets: Mapping[str, tuple[Any, Sequence[str]]],
    retrieval_sets: Mapping[str, tuple[Any, int]], batch_size: int, target: torch.device,
    loader: LoaderConfig | None,
) -> dict[str, Any]:
    """``zs_acc`` (mean over the zero-shot sets), the first retrieval set's recalls as the
    headline columns, and every set alone (``zs_acc/<set>``, ``retrieval/<set>/<metric>``)."""
    if not zero_shot_sets:
        raise ValueError("the evaluation suite needs at least one zero-shot set")
    metrics: dict[str, Any] = {
        f"zs_acc/{name}": zero_shot_accuracy(clip, images, templates, batch_size, target, loader)
        for name, (images, templates) in zero_shot_sets.items()
    }
    metrics["zs_acc"] = float(np.mean([metrics[f"zs_acc/{name}"] for name in zero_shot_sets]))
    headline = dict.fromkeys(RETRIEVAL_KEYS)
    for number, (name, (images, folds)) in enumerate(retrieval_sets.items()):
        recalls = evaluate_retrieval(clip, images, batch_size, target, folds, loader)
        headline = recalls if number == 0 else headline
        metrics.update({f"retrieval/{name}/{key}": value for key, value in recalls.items()})
    return {**metrics, **{key: headline[key] for key in RETRIEVAL_KEYS}}


def evaluate_step(
    clip: ClipModel,
    step: int,
    task: str,
    updated_test: ImageSet | Any,
    class_prompts: Sequence[str],
    phases: Sequence[Sequence[int]],
    zero_shot_sets: Mapping[str, tuple[Any, Sequence[str]]],
    retrieval_sets: Mapping[str, tuple[Any, int]] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    previous_rows: Sequence[Sequence[float]] | None = None,
    loader: LoaderConfig | None = None,
) -> dict[str, Any]:
    """All metrics of the model after ``step`` (0 = the starting model), as a JSON-ready dict.

    ``zero_shot_sets`` maps a name to (image set, prompt templates); ``retrieval_sets`` a name to
    (captioned image set, folds). Sets are in memory (``ImageSet``) or lazy (prepared splits,
    read through DataLoader workers as ``loader`` says).

    Keys: step, task, ut_acc, zs_acc (mean over the zero-shot sets), a_acc, bwt, learning_acc
    (R[step][step], the accuracy on the task just learnt; None at step 0), seen_acc (the classes
    learnt so far, classified among themselves; every class at step 0), i2t_r1..t2i_r10
    (the first retrieval set; None without one), ut_top1 (plain top-1 over all updated-task test
    images, the paper's OST UT-Acc), acc_row (accuracy on each phase 1..T), and each set alone
    as ``zs_acc/<name>`` and ``retrieval/<name>/<metric>``. ``previous_rows[i]`` is the acc_row
    of step i, required for i = 0..step-1 from step 2 on. The model is left as it was found.
    """
    step = int(step)
    if len(class_prompts) != len(updated_test.class_names):
        raise ValueError(
            f"need one prompt per class of the updated task ({len(updated_test.class_names)}), "
            f"got {len(class_prompts)}"
        )
    phases = _check_phases(phases, len(class_prompts))
    num_tasks = len(phases)
    if not 0 <= step <= num_tasks:
        raise ValueError(f"step {step} is outside 0..{num_tasks} (the number of phases)")
    earlier = _earlier_rows(previous_rows, step, num_tasks)

    with evaluating(clip, device) as target:
        class_feats = text_features(clip, class_prompts, batch_size, target)
        ut_predictions, ut_seen_predictions = _predictions_all_and_seen(
            clip, updated_test, class_feats, seen_classes(phases, step), batch_size, loader)
        acc_row = phase_accuracies(ut_predictions, updated_test.labels, phases)
        suite = _suite_metrics(clip, zero_shot_sets, retrieval_sets or {}, batch_size, target, loader)

    # Before step 2 neither UT-Acc nor BWT reads an earlier row: stand-ins keep the shapes.
    rows = np.asarray(earlier + [acc_row]) if step >= 2 else np.asarray([acc_row] * (step + 1))
    ut = ut_acc(rows, step)
    return {
        "step": step,
        "task": str(task),
        "ut_acc": ut,
        "zs_acc": suite["zs_acc"],
        "a_acc": (ut + suite["zs_acc"]) / 2.0,
        "bwt": bwt_at(rows, step),
        "learning_acc": float(acc_row[step - 1]) if step > 0 else None,
        "seen_acc": seen_accuracy(ut_seen_predictions, updated_test.labels, seen_classes(phases, step)),
        **{key: suite[key] for key in RETRIEVAL_KEYS},
        "ut_top1": top1_accuracy(ut_predictions, updated_test.labels),
        "acc_row": [float(v) for v in acc_row],
        **{key: value for key, value in suite.items() if "/" in key},
    }
