"""Image-text retrieval: Recall@K image->text and text->image with several captions per image,
optionally averaged over folds (COCO's 1K-test protocol).

Plain Python, NumPy and PyTorch; no Kedro import. Every recall is a fraction in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.data.loading import LoaderConfig, StreamedImages, as_lazy
from clip_continual.evaluation.features import (
    DEFAULT_BATCH_SIZE, as_float_tensor, evaluating, image_features, similarity_scores, text_features,
)
from clip_continual.model.clip import ClipModel

RECALL_KS = (1, 5, 10)
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)
# Rows of the similarity matrix scored at once: bounds memory on the 5K x 25K COCO protocol.
RETRIEVAL_CHUNK = 1024


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
        sims = similarity_scores(block, texts)
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
        sims = similarity_scores(images, block)  # (n_images, B)
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
    images = as_float_tensor(image_feats)
    texts = as_float_tensor(text_feats, images.device)
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
