"""Contrastive pretraining of a (tiny) CLIP on image-caption pairs: the embedded default's
stand-in for OpenAI's pretraining. Plain PyTorch + open_clip; no Kedro import."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from open_clip import ClipLoss
from tqdm.auto import tqdm

from clip_continual.data.common import ImageSet
from clip_continual.model.clip import ClipModel, encode_text, resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainingConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 30
    # Update only the token-embedding rows a batch uses (SparseAdam, no weight decay): the
    # 49,408-row table's dense gradient and AdamW pass cost about a seventh of a step here.
    sparse_token_embedding: bool = True
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretraining.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"pretraining.lr must be a positive, finite number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"pretraining.weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"pretraining.warmup_steps must be >= 0, got {self.warmup_steps}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PretrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(
                f"unknown pretraining parameters {sorted(unknown)}; known: {sorted(known)}"
            )
        values = dict(params)
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return cls(**values)

    def fingerprint(self) -> str:
        """Identifies what the training computes (progress display excluded)."""
        relevant = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "device")}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def learning_rate(step: int, config: PretrainingConfig) -> float:
    """Linear warm-up, then cosine decay to zero: a pure function of the step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As in open_clip: no decay on gains, biases, embeddings' scale terms and the logit scale.
    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def _sparse_token_embedding(model: torch.nn.Module, config: PretrainingConfig) -> torch.nn.Embedding | None:
    """The text tower's token embedding, switched to sparse gradients, when the recipe asks for it
    and the tower has one."""
    embedding = getattr(model, "token_embedding", None)
    if not config.sparse_token_embedding or not isinstance(embedding, torch.nn.Embedding):
        return None
    embedding.sparse = True
    return embedding


def _optimizers(model: torch.nn.Module, embedding: torch.nn.Embedding | None, config: PretrainingConfig,
                device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (fused: several times faster on CPU) and, for a sparse ``embedding``, SparseAdam
    for the rows each batch uses."""
    groups = _param_groups(model, config.weight_decay)
    if embedding is not None:
        for group in groups:
            group["params"] = [p for p in group["params"] if p is not embedding.weight]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, eps=1e-6, fused=device.type in ("cpu", "cuda"))]
    if embedding is not None:
        optimizers.append(torch.optim.SparseAdam([embedding.weight], lr=config.lr,
                                                 betas=config.betas, eps=1e-6))
    return optimizers


def _batches(count: int, config: PretrainingConfig) -> Iterator[np.ndarray]:
    """Sorted corpus indices of each step's batch: passes over a fresh permutation each."""
    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(count), 0
    for _ in range(config.steps):
        if cursor + config.batch_size > len(order):
            order, cursor = rng.permutation(count), 0
        yield np.sort(order[cursor : cursor + config.batch_size])
        cursor += config.batch_size


def _contrastive_step(clip: ClipModel, images: torch.Tensor, tokens: torch.Tensor,
                      optimizers: list[torch.optim.Optimizer], lr: float) -> float:
    model = clip.model
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
    image_features = model.encode_image(images, normalize=True)
    text_features = encode_text(model, tokens)
    loss = ClipLoss()(image_features, text_features, model.logit_scale.exp())
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def _check_corpus(corpus: ImageSet, config: PretrainingConfig) -> None:
    if corpus.captions is None:
        raise ValueError("the pretraining corpus needs captions")
    if len(corpus) < config.batch_size:
        raise ValueError(
            f"the pretraining corpus has {len(corpus)} pairs, fewer than one batch "
            f"({config.batch_size}); lower pretraining.batch_size or enlarge the corpus"
        )


def pretrain(
    start: ClipModel,
    corpus: ImageSet,
    config: PretrainingConfig,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[ClipModel, dict[str, Any]]:
    """Contrastive training with open_clip's ClipLoss; returns a new model and a summary."""
    _check_corpus(corpus, config)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    clip = start.clone()
    clip.model.to(device).train()
    # Captions repeat a lot (templates x attributes): tokenizing each distinct one once is far faster.
    distinct, inverse = np.unique(corpus.captions[:, 0], return_inverse=True)
    tokens = clip.tokenize([str(c) for c in distinct])[torch.from_numpy(inverse.reshape(-1))]
    sparse_embedding = _sparse_token_embedding(clip.model, config)
    optimizers = _optimizers(clip.model, sparse_embedding, config, device)
    losses: list[float] = []
    started, started_cpu = time.perf_counter(), time.process_time()
    bar = tqdm(total=config.steps, desc="pretraining", disable=not config.progress, mininterval=1.0)
    for step, index in enumerate(_batches(len(corpus), config)):
        lr = learning_rate(step, config)
        images = clip.preprocess(corpus.images[index], device)
        losses.append(_contrastive_step(clip, images, tokens[index].to(device), optimizers, lr))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, {"pretraining/loss": losses[-1], "pretraining/lr": lr})
    bar.close()
    if sparse_embedding is not None:
        sparse_embedding.sparse = False  # what continual training and checkpoints expect
    clip.model = clip.model.eval().cpu()
    clip.metadata = {**clip.metadata, "pretraining_fingerprint": config.fingerprint()}
    summary = {
        "steps": config.steps,
        "train_seconds": time.perf_counter() - started,
        # CPU seconds of this process (all threads): on a shared machine the steadier figure.
        "train_cpu_seconds": time.process_time() - started_cpu,
        "final_loss": float(np.mean(losses[-20:])),
    }
    return clip, summary
